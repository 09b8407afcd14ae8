"""ONNX Runtime sessions with an honest account of where they run.

The providers in effect are read from the session (``get_providers()``), never assumed from what the package
lists; when the requested provider is not the first in effect, the reason is recorded (or, strict, raised).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROVIDER_CHAINS = {
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "cpu": ["CPUExecutionProvider"],
}

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


class ProviderError(RuntimeError):
    """The requested execution provider is not in effect and the session is strict."""


@dataclass
class OrtSession:
    session: object
    requested: str
    providers: list[str]
    fallback_reason: str | None

    @property
    def execution_provider(self) -> str:
        return self.providers[0]


def make_session(path: str, provider: str = "cpu", device_id: int = 0, graph_optimization_level: str = "all",
                 intra_op_threads: int | None = None, strict: bool = False) -> OrtSession:
    """Open ``path`` on the first provider of the requested chain that works.

    Args:
        path: local ONNX file.
        provider: ``tensorrt``, ``cuda`` or ``cpu``; each falls back along the chain TensorRT -> CUDA -> CPU.
        device_id: GPU index for CUDA and TensorRT.
        graph_optimization_level: ``disable``, ``basic``, ``extended`` or ``all``.
        intra_op_threads: ORT intra-op threads (None: ORT's default).
        strict: raise ProviderError instead of falling back.

    Returns:
        The session with the providers in effect and the fallback reason, if any.
    """
    import onnxruntime as ort

    chain = PROVIDER_CHAINS[provider]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[graph_optimization_level])
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    available = set(ort.get_available_providers())
    reasons = []
    for i in range(len(chain)):
        wanted = [p for p in chain[i:] if p in available] or ["CPUExecutionProvider"]
        providers = [(p, {"device_id": device_id}) if p != "CPUExecutionProvider" else p for p in wanted]
        try:
            sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - a provider that cannot build this model: next in the chain
            reasons.append(f"{chain[i]}: {type(e).__name__}: {str(e)[:300]}")
            if strict:
                raise ProviderError(f"{path}: {reasons[-1]}") from e
            continue
        in_effect = sess.get_providers()
        reason = "; ".join(reasons) or None
        if in_effect[0] != chain[0]:
            missing = [p for p in chain if p not in available]
            reason = reason or (f"{chain[0]} requested, {in_effect[0]} in effect"
                                + (f" ({', '.join(missing)} not available in this onnxruntime build)" if missing else ""))
            if strict:
                raise ProviderError(f"{path}: {reason}")
        log.info("%s", json.dumps({"onnx_model": path, "requested": provider, "providers": in_effect,
                                   "fallback_reason": reason}))
        return OrtSession(sess, provider, in_effect, reason)
    raise ProviderError(f"{path}: no execution provider could open the model: {'; '.join(reasons)}")
