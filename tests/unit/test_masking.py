"""Padding to a bucket never changes a result: each bucketed model on native-length input against the same input
padded (with garbage in the padding, so a leak would show), FP32 on CPU: max |diff| <= 1e-5 and cosine >= 0.99999
on the valid part. Torch and the exported ONNX graphs both."""

import numpy as np
import pytest
import torch
from torch import nn

from models.masking import (
    bucket_for,
    gather_clamped,
    length_normalise,
    masked_mean,
    pad_to_bucket,
    valid_mask,
)
from models.onnx_classifier import OnnxHead, export_head
from models.video_classifier import ClassifierHead, HeadConfig

ATOL, COS = 1e-5, 0.99999
DIM = 32


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.double().flatten(), b.double().flatten()
    assert (a - b).abs().max().item() <= ATOL
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() >= COS


def garbage_pad(x: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``[B, N, D]`` to ``n`` tokens with large random values; return it and the valid mask."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.randn(x.shape[0], n - x.shape[1], *x.shape[2:], generator=g) * 100
    padded = torch.cat([x, pad], dim=1)
    return padded, valid_mask(padded, torch.full((x.shape[0],), x.shape[1]))


def test_buckets_and_masks():
    assert [bucket_for(n, (4, 8, 16)) for n in (1, 4, 5, 16, 17)] == [4, 4, 8, 16, 17]
    x = torch.ones(2, 5, 3)
    padded, n = pad_to_bucket(x, (8,), dim=1)
    assert padded.shape == (2, 8, 3) and n == 5 and padded[:, 5:].abs().sum() == 0
    assert pad_to_bucket(x, (4,), dim=1)[0] is x  # larger than every bucket: as is
    assert valid_mask(padded, torch.tensor([5, 2])).tolist() == [[True] * 5 + [False] * 3,
                                                                  [True] * 2 + [False] * 6]


def test_length_normalise_and_pooling_use_the_valid_part_only():
    torch.manual_seed(0)
    x = torch.randn(3, 11, 4) * 3 + 2
    padded, valid = garbage_pad(x, 32)
    native = length_normalise(x, torch.ones(3, 11, dtype=torch.bool))
    out = length_normalise(padded, valid)
    close(out[:, :11], native)
    assert out[:, 11:].abs().max() == 0  # the padded region is zero after normalisation
    assert native.mean(dim=1).abs().max() < 1e-5 and (native.var(dim=1, unbiased=False) - 1).abs().max() < 1e-3
    close(masked_mean(padded, valid), x.mean(dim=1))


def test_gather_is_clamped_to_the_valid_length():
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    got = gather_clamped(x, torch.tensor([[0, 3, 9], [-2, 1, 5]]), torch.tensor([4, 2]))
    assert got[0].tolist() == [x[0, 0].tolist(), x[0, 3].tolist(), x[0, 3].tolist()]
    assert got[1].tolist() == [x[1, 0].tolist(), x[1, 1].tolist(), x[1, 1].tolist()]


def head(pooling: str, depth: int = 2) -> ClassifierHead:
    torch.manual_seed(1)
    h = ClassifierHead(DIM, HeadConfig(labels=["a", "b", "c"], pooling=pooling, depth=depth, num_heads=4)).eval()
    for p in h.parameters():  # non-trivial weights everywhere (LayerNorm included)
        p.data.normal_(0, 0.2)
    return h


def test_written_out_attention_equals_multihead_attention():
    h = head("attentive", depth=1)
    block = h.blocks[0]
    q, x = torch.randn(3, 1, DIM), torch.randn(3, 9, DIM)
    valid = valid_mask(x, torch.tensor([9, 4, 1]))
    with torch.no_grad():
        ours = block._attend(q, x, valid)
        ref = block.attn(q, x, x, key_padding_mask=~valid, need_weights=False)[0]
        close(ours, ref)
        close(block._attend(q, x, None), block.attn(q, x, x, need_weights=False)[0])


@pytest.mark.parametrize("pooling", ["linear", "attentive"])
def test_head_padded_equals_native_in_torch(pooling):
    h = head(pooling)
    torch.manual_seed(2)
    with torch.no_grad():
        for n in (1, 7, 37, 64):
            x = torch.randn(4, n, DIM)
            native = h(x)
            for bucket in (64, 128):
                padded, valid = garbage_pad(x, bucket, seed=n)
                close(h(padded, valid), native)
        # without the mask the padding would leak: the check above can fail
        x = torch.randn(2, 10, DIM)
        padded, _ = garbage_pad(x, 64)
        assert (h(padded) - h(x)).abs().max() > 1e-2


@pytest.mark.parametrize("pooling", ["linear", "attentive"])
def test_exported_head_padded_equals_native_in_onnx_runtime(tmp_path, pooling):
    import onnxruntime as ort

    h = head(pooling)
    path = export_head(h, DIM, str(tmp_path / f"{pooling}.onnx"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    torch.manual_seed(3)
    for n in (3, 37, 64):
        x = torch.randn(2, n, DIM)
        native = sess.run(None, {"tokens": x.numpy(), "valid": np.ones((2, n), bool)})[0]
        with torch.no_grad():
            close(torch.from_numpy(native), h(x))
        padded, valid = garbage_pad(x, 128, seed=n)
        got = sess.run(None, {"tokens": padded.numpy(), "valid": valid.numpy()})[0]
        close(torch.from_numpy(got), torch.from_numpy(native))
    # the bucketed runner: mixed lengths in one call, padded in batch and length, each row as if alone
    runner = OnnxHead(path, DIM, batch_buckets=(1, 4), length_buckets=(16, 64))
    seqs = [torch.randn(n, DIM) for n in (5, 16, 40, 2, 64, 9)]
    together = runner(seqs)
    with torch.no_grad():
        for s, row in zip(seqs, together):
            close(row, h(s[None])[0])
    assert runner.ort.execution_provider == "CPUExecutionProvider"


class SequenceModel(nn.Module):
    """A model exported for shape-specialised backends: length-aware normalisation, masked self-attention, masked
    pooling, and a clamped gather of chosen positions."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        from models.masking import masked_softmax_scores

        valid = valid_mask(x, lengths)
        h = self.proj(length_normalise(x, valid))
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)
        scores = (h @ w_q.T) @ (h @ w_k.T).transpose(1, 2) / 4.0
        h = masked_softmax_scores(scores[:, None], valid)[:, 0] @ (h @ w_v.T)
        picked = gather_clamped(h, picks, lengths).mean(dim=1)
        return self.out(torch.cat([masked_mean(h, valid), picked], dim=-1))


def test_exported_sequence_model_padded_equals_native(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(4)
    model = SequenceModel().eval()
    path = str(tmp_path / "seq.onnx")
    x0, l0, p0 = torch.randn(2, 6, 8), torch.tensor([6, 6]), torch.tensor([[0, 5], [2, 3]])
    torch.onnx.export(model, (x0, l0, p0), path, input_names=["x", "lengths", "picks"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "n"}, "lengths": {0: "b"}, "picks": {0: "b"}}, opset_version=17,
                      dynamo=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n, bucket in ((5, 8), (13, 16), (30, 64)):
        x = torch.randn(3, n, 8)
        lengths = torch.full((3,), n)
        picks = torch.tensor([[0, n - 1], [1, n + 7], [n // 2, 2]])  # one index past the end: clamped
        native = sess.run(None, {"x": x.numpy(), "lengths": lengths.numpy(), "picks": picks.numpy()})[0]
        padded, _ = garbage_pad(x, bucket, seed=n)
        got = sess.run(None, {"x": padded.numpy(), "lengths": lengths.numpy(), "picks": picks.numpy()})[0]
        close(torch.from_numpy(got), torch.from_numpy(native))
        with torch.no_grad():
            close(torch.from_numpy(native), model(x, lengths, picks))
