"""Tests of stvr.warp: TensorFlow Addons semantics of interpolate_spline,
sparse_image_warp and dense_image_warp (reference-facts.md section 10), autograd,
dtypes, devices and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import RBFInterpolator

from stvr import warp
from stvr.warp import (
    boundary_locations,
    dense_image_warp,
    dense_image_warp_reference,
    dense_warp_states,
    interpolate_spline,
    sparse_image_warp,
    spline_dense_flow,
    warp_states,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- numpy references
def np_phi(r2: np.ndarray, order: int) -> np.ndarray:
    """TFA's _phi on squared distances (EPSILON = 1e-10)."""
    eps = 1e-10
    if order == 1:
        return np.sqrt(np.maximum(r2, eps))
    if order == 2:
        return 0.5 * r2 * np.log(np.maximum(r2, eps))
    if order == 4:
        return 0.5 * np.square(r2) * np.log(np.maximum(r2, eps))
    r2 = np.maximum(r2, eps)
    if order % 2 == 0:
        return 0.5 * np.power(r2, 0.5 * order) * np.log(r2)
    return np.power(r2, 0.5 * order)


def np_spline(c, f, q, order, reg=0.0):
    """Transcription of TFA interpolate_spline for one batch element (float64)."""
    n, d = c.shape
    a = np_phi(((c[:, None] - c[None]) ** 2).sum(-1), order)
    if reg > 0:
        a = a + reg * np.eye(n)
    p = np.concatenate([c, np.ones((n, 1))], 1)
    lhs = np.block([[a, p], [p.T, np.zeros((d + 1, d + 1))]])
    rhs = np.concatenate([f, np.zeros((d + 1, f.shape[1]))], 0)
    wv = np.linalg.solve(lhs, rhs)
    w, v = wv[:n], wv[n:]
    qa = np_phi(((q[:, None] - c[None]) ** 2).sum(-1), order)
    return qa @ w + np.concatenate([q, np.ones((len(q), 1))], 1) @ v


def np_dense_image_warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """TFA dense_image_warp + interpolate_bilinear, image [B, H, W, C], flow [B, H, W, 2]."""
    b, h, w, c = image.shape
    gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    q = np.stack([gy, gx], -1)[None].astype(np.float64) - flow  # [B, H, W, 2]
    floors, alphas = [], []
    for dim, size in ((0, h), (1, w)):
        qd = q[..., dim]
        floor = np.minimum(np.maximum(0.0, np.floor(qd)), size - 2)
        floors.append(floor.astype(np.int64))
        alphas.append(np.minimum(np.maximum(0.0, qd - floor), 1.0)[..., None])
    bi = np.arange(b)[:, None, None]
    y0, x0 = floors
    tl = image[bi, y0, x0]
    tr = image[bi, y0, x0 + 1]
    bl = image[bi, y0 + 1, x0]
    br = image[bi, y0 + 1, x0 + 1]
    top = alphas[1] * (tr - tl) + tl
    bottom = alphas[1] * (br - bl) + bl
    return alphas[0] * (bottom - top) + top


def rand(*shape, dtype=torch.float64, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def well_spread_points(b, n, h, w, seed=0, dtype=torch.float64):
    """Distinct, non-collinear points inside [1, h-2] x [1, w-2]."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(b, n, 2, generator=g, dtype=dtype)
    return 1.0 + pts * torch.tensor([h - 3.0, w - 3.0], dtype=dtype)


# --------------------------------------------------------------------------- interpolate_spline
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("reg", [0.0, 0.05])
def test_spline_matches_tfa_transcription(order, reg):
    c = well_spread_points(3, 7, 12, 12, seed=1)
    f = rand(3, 7, 3, seed=2)
    q = well_spread_points(3, 11, 12, 12, seed=3)
    out = interpolate_spline(c, f, q, order, reg)
    assert out.shape == (3, 11, 3) and out.dtype == torch.float64
    ref = np.stack([np_spline(c[i].numpy(), f[i].numpy(), q[i].numpy(), order, reg) for i in range(3)])
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("order,tol", [(2, 1e-9), (3, 1e-8), (4, 1e-7), (1, 1e-4)])
def test_spline_reproduces_train_values_at_reg_zero(order, tol):
    # Order 1: TFA clamps r^2 at 1e-10, so phi(0) = 1e-5 acts as a tiny ridge and
    # the train values are reproduced only to ~1e-5 (exactly TFA's behaviour).
    c = well_spread_points(2, 9, 20, 20, seed=4)
    f = rand(2, 9, 2, seed=5)
    out = interpolate_spline(c, f, c, order)
    assert (out - f).abs().max() < tol


def test_spline_regularization_smooths():
    c = well_spread_points(1, 12, 20, 20, seed=6)
    f = rand(1, 12, 1, seed=7)
    exact = interpolate_spline(c, f, c, 2, 0.0)
    smooth = interpolate_spline(c, f, c, 2, 10.0)
    assert (exact - f).abs().max() < 1e-9
    assert (smooth - f).abs().max() > 1e-2  # no longer interpolates


@pytest.mark.parametrize("order,kernel,tol", [(1, "linear", 1e-4), (2, "thin_plate_spline", 1e-8), (3, "cubic", 1e-8)])
def test_spline_agrees_with_scipy_rbf(order, kernel, tol):
    c = well_spread_points(2, 10, 16, 16, seed=8)
    f = rand(2, 10, 3, seed=9)
    q = torch.rand(2, 40, 2, generator=torch.Generator().manual_seed(10), dtype=torch.float64) * 15
    out = interpolate_spline(c, f, q, order, 0.0).numpy()
    for i in range(2):
        ref = RBFInterpolator(c[i].numpy(), f[i].numpy(), kernel=kernel, degree=1)(q[i].numpy())
        np.testing.assert_allclose(out[i], ref, atol=tol, rtol=0)


def test_spline_linear_part_reproduced_exactly():
    # values that are an affine function of the points are reproduced everywhere
    c = well_spread_points(2, 8, 10, 10, seed=11)
    a = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    f = c @ a + torch.tensor([3.0, -2.0], dtype=torch.float64)
    q = well_spread_points(2, 30, 10, 10, seed=12)
    out = interpolate_spline(c, f, q, 2)
    torch.testing.assert_close(out, q @ a + torch.tensor([3.0, -2.0], dtype=torch.float64), rtol=0, atol=1e-9)


def test_spline_batched_equals_per_element():
    c = well_spread_points(4, 6, 10, 10, seed=13)
    f = rand(4, 6, 2, seed=14)
    q = well_spread_points(4, 5, 10, 10, seed=15)
    out = interpolate_spline(c, f, q, 2)
    for i in range(4):
        torch.testing.assert_close(out[i : i + 1], interpolate_spline(c[i : i + 1], f[i : i + 1], q[i : i + 1], 2))


def test_spline_float32_close_to_float64():
    c = well_spread_points(2, 9, 20, 20, seed=16)
    f = rand(2, 9, 2, seed=17)
    q = well_spread_points(2, 20, 20, 20, seed=18)
    out32 = interpolate_spline(c.float(), f.float(), q.float(), 2)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), interpolate_spline(c, f, q, 2), rtol=0, atol=2e-3)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_spline_gradcheck(order, reg):
    c = well_spread_points(2, 6, 8, 8, seed=19).requires_grad_()
    f = rand(2, 6, 2, seed=20).requires_grad_()
    q = well_spread_points(2, 4, 8, 8, seed=21).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, d: interpolate_spline(a, b, d, order, reg), (c, f, q))


# --------------------------------------------------------------------------- boundary points
def test_boundary_layout_matches_tfa_k4_20x20():
    pts = boundary_locations(20, 20, 4, dtype=torch.float64)
    c = [0.0, 4.75, 9.5, 14.25, 19.0]
    expected = (
        [(0.0, x) for x in c]
        + [(4.75, 0.0), (4.75, 19.0), (9.5, 0.0), (9.5, 19.0), (14.25, 0.0), (14.25, 19.0)]
        + [(19.0, x) for x in c]
    )
    assert pts.shape == (16, 2)
    assert [tuple(p) for p in pts.tolist()] == expected


def test_boundary_layout_small_k_and_rectangles():
    assert boundary_locations(5, 7, 1).tolist() == [[0, 0], [0, 6], [4, 0], [4, 6]]
    assert boundary_locations(5, 9, 2).tolist() == [[0, 0], [0, 4], [0, 8], [2, 0], [2, 8], [4, 0], [4, 4], [4, 8]]
    assert boundary_locations(8, 8, 0).shape == (0, 2)
    for k in (1, 2, 3, 5):
        assert boundary_locations(11, 13, k).shape == (4 * k, 2)


# --------------------------------------------------------------------------- sparse_image_warp
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("order,k", [(1, 0), (2, 4), (3, 2)])
def test_sparse_warp_identity(device, dtype, order, k):
    img = rand(2, 3, 9, 11, dtype=dtype).to(device)
    pts = well_spread_points(2, 5, 9, 11, dtype=dtype).to(device)
    out, flow = sparse_image_warp(img, pts, pts, order, 0.0, k)
    assert out.shape == img.shape and flow.shape == (2, 9, 11, 2)
    assert out.dtype == dtype and out.device.type == device
    assert torch.equal(flow, torch.zeros_like(flow))
    assert torch.equal(out, img)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_sparse_warp_moves_source_content_to_destination(dtype, tol):
    # integer points: warped(dest_i) == image(source_i) exactly up to rounding
    img = rand(1, 4, 16, 16, dtype=dtype, seed=3)
    src = torch.tensor([[[4.0, 4.0], [4.0, 11.0], [11.0, 4.0], [11.0, 11.0], [8.0, 8.0]]], dtype=dtype)
    dst = src + torch.tensor([[[1.0, 2.0], [-1.0, 1.0], [2.0, 0.0], [0.0, -2.0], [1.0, 1.0]]], dtype=dtype)
    out, flow = sparse_image_warp(img, src, dst, 2, 0.0, 3)
    for (sy, sx), (dy, dx) in zip(src[0].long().tolist(), dst[0].long().tolist()):
        torch.testing.assert_close(out[0, :, dy, dx], img[0, :, sy, sx], rtol=0, atol=tol)
        torch.testing.assert_close(flow[0, dy, dx], torch.tensor([dy - sy, dx - sx], dtype=dtype), rtol=0, atol=tol)


def test_sparse_warp_uniform_translation_moves_interior():
    img = rand(2, 3, 14, 15, seed=4)
    src = well_spread_points(2, 6, 14, 15, seed=5)
    shift = torch.tensor([2.0, -3.0], dtype=torch.float64)
    out, flow = sparse_image_warp(img, src, src + shift, 2, 0.0, 0)
    # a constant displacement is reproduced exactly by the linear term: constant flow
    torch.testing.assert_close(flow, shift.expand_as(flow), rtol=0, atol=1e-9)
    # interior content moves by (2, -3): out[y, x] = img[y - 2, x + 3]
    torch.testing.assert_close(out[:, :, 2:, :-3], img[:, :, :-2, 3:], rtol=0, atol=1e-9)
    # fractional translation: flow still constant, samples are bilinear blends
    out2, flow2 = sparse_image_warp(img, src, src + 0.5, 1, 0.0, 0)
    torch.testing.assert_close(flow2, torch.full_like(flow2, 0.5), rtol=0, atol=1e-6)
    blend = 0.25 * (img[:, :, :-1, :-1] + img[:, :, 1:, :-1] + img[:, :, :-1, 1:] + img[:, :, 1:, 1:])
    torch.testing.assert_close(out2[:, :, 1:, 1:], blend, rtol=0, atol=1e-5)


def test_sparse_warp_boundary_points_stay_pinned():
    # 21x21 with k=4: boundary points on integer pixels 0, 5, 10, 15, 20
    img = rand(2, 2, 21, 21, seed=6)
    src = torch.tensor([[5.0, 5.0], [5.0, 15.0], [15.0, 5.0], [15.0, 15.0], [10.0, 10.0]], dtype=torch.float64)
    src = src.expand(2, -1, -1)
    dst = src + rand(2, 5, 2, seed=7, scale=1.5)
    out, flow = sparse_image_warp(img, src, dst, 2, 0.0, 4)
    bnd = boundary_locations(21, 21, 4).long()
    ys, xs = bnd[:, 0], bnd[:, 1]
    assert flow[:, ys, xs].abs().max() < 1e-9
    torch.testing.assert_close(out[:, :, ys, xs], img[:, :, ys, xs], rtol=0, atol=1e-9)
    # without boundary points the same control points move the corners
    _, free = sparse_image_warp(img, src, dst, 2, 0.0, 0)
    assert free[:, ys, xs].abs().max() > 0.1


def test_dense_flow_is_spline_fitted_at_destinations():
    src = well_spread_points(2, 7, 12, 10, seed=8)
    dst = src + rand(2, 7, 2, seed=9, scale=0.8)
    flow = spline_dense_flow(src, dst, 12, 10, 2, 0.0, 3)
    centers = torch.cat([dst, boundary_locations(12, 10, 3, dtype=torch.float64).expand(2, -1, -1)], 1)
    values = torch.cat([dst - src, torch.zeros(2, 12, 2, dtype=torch.float64)], 1)
    gy, gx = torch.meshgrid(torch.arange(12.0), torch.arange(10.0), indexing="ij")
    grid = torch.stack([gy, gx], -1).reshape(1, -1, 2).double().expand(2, -1, -1)
    expected = interpolate_spline(centers, values, grid, 2).view(2, 12, 10, 2)
    torch.testing.assert_close(flow, expected)
    _, flow_again = sparse_image_warp(rand(2, 1, 12, 10), src, dst, 2, 0.0, 3)
    torch.testing.assert_close(flow_again, flow)


def test_warp_states_equals_separate_warps():
    h, c = rand(2, 5, 8, 9, seed=10), rand(2, 3, 8, 9, seed=11)
    src = well_spread_points(2, 4, 8, 9, seed=12)
    dst = src + rand(2, 4, 2, seed=13, scale=0.7)
    (wh, wc), flow = warp_states((h, c), src, dst, 2, 2)
    assert wh.is_contiguous() and wc.is_contiguous()
    torch.testing.assert_close(wh, sparse_image_warp(h, src, dst, 2, 0.0, 2)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(wc, sparse_image_warp(c, src, dst, 2, 0.0, 2)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("order,reg,k", [(2, 0.0, 2), (1, 0.0, 0), (3, 0.05, 1)])
def test_sparse_warp_gradcheck(order, reg, k):
    img = rand(2, 2, 6, 7, seed=14).requires_grad_()
    src = well_spread_points(2, 4, 6, 7, seed=15).requires_grad_()
    dst = (src.detach() + rand(2, 4, 2, seed=16, scale=0.6)).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, s, d: sparse_image_warp(i, s, d, order, reg, k), (img, src, dst))


def test_warp_states_gradcheck():
    h = rand(1, 2, 5, 6, seed=17).requires_grad_()
    c = rand(1, 3, 5, 6, seed=18).requires_grad_()
    src = well_spread_points(1, 3, 5, 6, seed=19)
    dst = (src + rand(1, 3, 2, seed=20, scale=0.5)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, d: tuple(warp_states((a, b), src, d, 2, 2)[0]), (h, c, dst))


def test_zero_flow_has_nonzero_gradient_wrt_displacements():
    # the one-sided bilinear derivative at integer samples (a zero-initialized warp
    # cell must be able to start moving)
    img = rand(1, 1, 10, 10, seed=21)
    src = torch.tensor([[[3.0, 3.0], [3.0, 6.0], [6.0, 3.0], [6.0, 6.0]]], dtype=torch.float64)
    off = torch.zeros(1, 4, 2, dtype=torch.float64, requires_grad=True)
    out, _ = sparse_image_warp(img, src, src + off, 2, 0.0, 1)
    (out * rand(1, 1, 10, 10, seed=22)).sum().backward()
    assert off.grad.abs().min() > 0


# --------------------------------------------------------------------------- dense_image_warp
@pytest.mark.parametrize("device", DEVICES)
def test_dense_warp_matches_tfa_bilinear_formula(device):
    img = rand(2, 3, 7, 9, seed=23)
    flow = rand(2, 7, 9, 2, seed=24, scale=3.0)  # many samples out of range -> clamped
    flow[0, 0, 0] = torch.tensor([50.0, -50.0], dtype=torch.float64)
    flow[1, 3, 4] = torch.tensor([3.0, 4.0], dtype=torch.float64)  # exactly on a pixel
    out = dense_image_warp(img.to(device), flow.to(device)).cpu()
    ref = np_dense_image_warp(img.permute(0, 2, 3, 1).numpy(), flow.numpy()).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, dense_image_warp_reference(img, flow), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0, :, 0, 0], img[0, :, 0, 8], rtol=0, atol=0)  # clamped to the border
    torch.testing.assert_close(out[1, :, 3, 4], img[1, :, 0, 0], rtol=0, atol=1e-12)
    out32 = dense_image_warp(img.float(), flow.float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=0, atol=1e-5)


def test_dense_warp_memory_formats_and_multi_state():
    img = rand(2, 4, 6, 5, seed=25)
    flow = rand(2, 6, 5, 2, seed=26)
    ref = dense_image_warp_reference(img, flow)
    cl = dense_image_warp(img.contiguous(memory_format=torch.channels_last), flow)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref, rtol=0, atol=1e-12)
    nchw = dense_image_warp(img, flow)
    assert nchw.is_contiguous()
    a, b = dense_warp_states((img[:, :1], img[:, 1:]), flow)
    torch.testing.assert_close(torch.cat([a, b], 1), ref, rtol=0, atol=1e-12)
    # 256 float32 channels: padded row table path
    wide = rand(1, 256, 4, 4, seed=27, dtype=torch.float32)
    f = rand(1, 4, 4, 2, seed=28, dtype=torch.float32)
    torch.testing.assert_close(dense_image_warp(wide, f), dense_image_warp_reference(wide, f), rtol=0, atol=1e-5)


def test_dense_warp_gradcheck():
    img = rand(2, 3, 5, 6, seed=29).requires_grad_()
    flow = rand(2, 5, 6, 2, seed=30, scale=1.5).requires_grad_()
    assert torch.autograd.gradcheck(dense_image_warp, (img, flow))
    cl = img.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(dense_image_warp, (cl, flow))
    h = rand(1, 2, 4, 5, seed=31).requires_grad_()
    c = rand(1, 1, 4, 5, seed=32).requires_grad_()
    f = rand(1, 4, 5, 2, seed=33).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, g: tuple(dense_warp_states((a, b), g)), (h, c, f))


@pytest.mark.parametrize("channels,channels_last", [(3, False), (3, True), (128, False), (128, True)])
def test_dense_warp_gradients_match_grid_sample(channels, channels_last):
    # 128 float64 channels = 1024-byte rows: the padded row-table path
    img = rand(2, channels, 6, 7, seed=34)
    if channels_last:
        img = img.contiguous(memory_format=torch.channels_last)
    img.requires_grad_()
    flow = rand(2, 6, 7, 2, seed=35, scale=2.0).requires_grad_()
    w = rand(2, channels, 6, 7, seed=36)
    g1 = torch.autograd.grad((dense_image_warp(img, flow) * w).sum(), (img, flow))
    g2 = torch.autograd.grad((dense_image_warp_reference(img, flow) * w).sum(), (img, flow))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- errors
def test_errors_shapes_and_batches():
    img = torch.zeros(2, 3, 8, 8)
    pts = torch.rand(2, 4, 2) * 7
    with pytest.raises(ValueError, match="rank 4"):
        sparse_image_warp(torch.zeros(3, 8, 8), pts, pts)
    with pytest.raises(ValueError, match=r"\[B, N, 2\]"):
        sparse_image_warp(img, torch.rand(2, 4, 3), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        sparse_image_warp(img, pts, pts[:, :3])
    with pytest.raises(ValueError, match="batch size mismatch"):
        sparse_image_warp(img, pts[:1], pts[:1])
    with pytest.raises(ValueError, match=">= 2"):
        sparse_image_warp(torch.zeros(2, 3, 1, 8), pts, pts)
    with pytest.raises(ValueError, match="dtype mismatch"):
        sparse_image_warp(img, pts.double(), pts.double())
    with pytest.raises(ValueError, match="flow must be"):
        dense_image_warp(img, torch.zeros(2, 8, 7, 2))
    with pytest.raises(ValueError, match="flow must be"):
        dense_image_warp(img, torch.zeros(1, 8, 8, 2))
    with pytest.raises(ValueError, match="floating-point"):
        dense_image_warp(img.long(), torch.zeros(2, 8, 8, 2))
    with pytest.raises(ValueError, match="train_values"):
        interpolate_spline(pts, torch.zeros(2, 5, 1), pts, 2)
    with pytest.raises(ValueError, match="query_points"):
        interpolate_spline(pts, torch.zeros(2, 4, 1), torch.zeros(2, 3, 3), 2)
    with pytest.raises(ValueError, match="query_points"):
        interpolate_spline(pts, torch.zeros(2, 4, 1), torch.zeros(1, 3, 2), 2)
    with pytest.raises(ValueError, match="order"):
        interpolate_spline(pts, torch.zeros(2, 4, 1), pts, 0)
    with pytest.raises(ValueError, match="order"):
        interpolate_spline(pts, torch.zeros(2, 4, 1), pts, 2.0)
    with pytest.raises(ValueError, match="regularization_weight"):
        interpolate_spline(pts, torch.zeros(2, 4, 1), pts, 2, -1.0)
    with pytest.raises(ValueError, match="num_boundary_points"):
        sparse_image_warp(img, pts, pts, num_boundary_points=-1)
    with pytest.raises(ValueError, match="sequence"):
        warp_states(img, pts, pts)
    with pytest.raises(ValueError, match="states\\[1\\]"):
        warp_states((img, torch.zeros(2, 3, 8, 7)), pts, pts)


def test_errors_non_finite():
    img = torch.zeros(1, 2, 8, 8)
    pts = torch.tensor([[[2.0, 2.0], [2.0, 5.0], [5.0, 3.0]]])
    for bad in (float("nan"), float("inf")):
        broken = pts.clone()
        broken[0, 1, 0] = bad
        with pytest.raises(ValueError, match="dest_control_point_locations contains non-finite"):
            sparse_image_warp(img, pts, broken, num_boundary_points=2)
        with pytest.raises(ValueError, match="source_control_point_locations contains non-finite"):
            sparse_image_warp(img, broken, pts, num_boundary_points=2)
        with pytest.raises(ValueError, match="train_values contains non-finite"):
            interpolate_spline(pts, broken, pts, 2)
        flow = torch.zeros(1, 8, 8, 2)
        flow[0, 3, 3, 1] = bad
        with pytest.raises(ValueError, match="flow contains non-finite"):
            dense_image_warp(img, flow)


def test_duplicate_control_points_raise_or_regularize():
    img = rand(1, 2, 9, 9, seed=37)
    src = torch.tensor([[[2.0, 2.0], [2.0, 6.0], [6.0, 4.0], [6.0, 4.0]]], dtype=torch.float64)
    dst = src + torch.tensor([[[0.5, 0.0], [0.0, 0.5], [0.5, 0.5], [-0.5, 0.0]]], dtype=torch.float64)
    dst[0, 3] = dst[0, 2]  # two destinations coincide
    with pytest.raises(ValueError, match="coincide"):
        sparse_image_warp(img, src, dst, 2, 0.0, 2)
    with pytest.raises(ValueError, match="coincide"):
        interpolate_spline(dst, torch.zeros(1, 4, 1, dtype=torch.float64), dst, 1)
    # a destination on a boundary point also coincides
    corner = src.clone()
    corner[0, 0] = torch.tensor([0.0, 0.0])
    with pytest.raises(ValueError, match="coincide"):
        sparse_image_warp(img, src, corner, 2, 0.0, 2)
    # with regularization the system is solvable and the result finite
    out, flow = sparse_image_warp(img, src, dst, 2, 0.1, 2)
    assert torch.isfinite(out).all() and torch.isfinite(flow).all()
    # float32 duplicates are caught too
    with pytest.raises(ValueError, match="coincide"):
        sparse_image_warp(img.float(), src.float(), dst.float(), 2, 0.0, 2)


def test_collinear_points_without_boundary_raise():
    pts = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        interpolate_spline(pts, torch.ones(1, 3, 1, dtype=torch.float64), pts, 2)


def test_constant_point_caches_survive_inference_mode():
    img = rand(1, 2, 7, 7, seed=38)
    src = well_spread_points(1, 3, 7, 7, seed=39)
    with torch.inference_mode():
        sparse_image_warp(img, src, src + 0.3, 2, 0.0, 3)  # populates the caches
    dst = (src + 0.3).requires_grad_()
    out, _ = sparse_image_warp(img, src, dst, 2, 0.0, 3)
    out.sum().backward()
    assert dst.grad is not None and torch.isfinite(dst.grad).all()
    assert warp.EPSILON == 1e-10
