"""The GPU tests' clips: MEDIASIEVE_GPU_MEDIA (a folder made elsewhere, for a machine without the ffmpeg CLI) or made
here with the ffmpeg CLI."""

import os

import pytest


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    given = os.environ.get("MEDIASIEVE_GPU_MEDIA")
    if given:
        return {os.path.splitext(n)[0]: os.path.join(given, n) for n in os.listdir(given)}
    from tests.gpu.device_kit import gpu_clips

    return gpu_clips(str(tmp_path_factory.mktemp("gpu")))
