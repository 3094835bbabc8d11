"""Anomaly-map post-processing: the matrix form of upsampling + smoothing against the plain
upsampling and convolutions (which a graph of symbolic size runs), and in an exported graph."""

from __future__ import annotations

import contextlib
import io
import warnings

import onnx
import onnxruntime
import pytest
import torch

from anomalens.components.maps import anomaly_maps, axis_matrix, gaussian_blur, resize_maps


@pytest.mark.parametrize(
    ("coarse", "size", "sigma"),
    [
        ((32, 32), (256, 256), 4.0),  # PatchCore's default
        ((16, 24), (256, 384), 4.0),  # not square
        ((3, 5), (7, 40), 4.0),  # axes shorter than the kernel radius: edge repeated
        ((64, 64), (64, 64), 4.0),  # no resizing
        ((8, 8), (64, 64), 0.0),  # no smoothing
    ],
)
def test_anomaly_maps_match_upsampling_then_blurring(coarse, size, sigma) -> None:
    scores = torch.rand(2, 1, *coarse, generator=torch.Generator().manual_seed(0)) + 0.5
    expected = gaussian_blur(resize_maps(scores, size), sigma)[:, 0]
    torch.testing.assert_close(anomaly_maps(scores, size, sigma), expected, rtol=1e-5, atol=0)


class _Maps(torch.nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return anomaly_maps(scores, self.size, 4.0)


def _export(module: torch.nn.Module, scores: torch.Tensor) -> onnx.ModelProto:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (scores,), dynamo=True).model_proto


def test_an_exported_graph_takes_the_matrices_an_eager_call_built() -> None:
    scores = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    built = _Maps((64, 64))
    expected = built(scores)  # eager: builds the matrix, which the graph then holds
    graph = _export(built, scores)
    ops = {node.op_type for node in graph.graph.node}
    assert "MatMul" in ops and "Conv" not in ops
    session = onnxruntime.InferenceSession(graph.SerializeToString())
    (got,) = session.run(None, {session.get_inputs()[0].name: scores.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-6)

    # a size no eager call built: the convolutions, and tracing leaves nothing behind
    unbuilt = _Maps((40, 44))
    graph = _export(unbuilt, scores)
    assert "Conv" in {node.op_type for node in graph.graph.node}
    matrix = axis_matrix(8, 40, 4.0)
    assert type(matrix) is torch.Tensor
    blurred = gaussian_blur(resize_maps(scores, (40, 44)), 4.0)[:, 0]
    torch.testing.assert_close(unbuilt(scores), blurred, rtol=1e-5, atol=0)
