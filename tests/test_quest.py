"""QuEST (diffusion) quantization: quantizers, integer kernels, calibration, selective finetuning,
artifacts and exact removal. Tiny models only; quality on the embedded models is in the benchmark."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from accel.kernels import cpu_int8_linear
from accel.kernels.cpp_build import CppExtension
from tiny import TinyPipe, tiny_dit

import accel
from accel.methods import quest  # registers "quest"
from accel.quant import kernels
from accel.quant.calibration import collect
from accel.quant.finetune import pick_sensitive, sensitivity, teacher_outputs, temporal_layers
from accel.quant.packing import pack_int4, unpack_int4
from accel.quant.qlinear import LayerSpec, LSQLinear, QuantLinear
from accel.quant.quantizers import act_qparams, fake_quant, qrange, token_qparams, weight_qparams
from accel.quant import workflow
from accel.quant.workflow import lsq_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> quest.QuESTConfig:
    defaults = {
        "calib_seeds": 1,
        "calib_steps": 4,
        "finetune_iters": 0,
        "max_inputs": 8,
        "sensitive_layers": 2,
        "keep_float_when_faster": False,  # which layers stay float depends on timings; tested on its own
    }
    return quest.QuESTConfig(**{**defaults, **kw})


# -- quantizers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_quantizer_error_bound(bits, symmetric):
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 16)[:, None]
    scale, zero = weight_qparams(w, bits, symmetric, search=False)  # min/max range: nothing clipped
    err = (fake_quant(w, scale[:, None], zero[:, None], *qrange(bits, symmetric)) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())  # rounding error at most half a step
    if symmetric:
        torch.testing.assert_close(scale, w.abs().amax(1) / (2 ** (bits - 1) - 1))
    searched, _ = weight_qparams(w, bits, symmetric, search=True)
    mse = lambda s, z: (fake_quant(w, s[:, None], z[:, None], *qrange(bits, symmetric)) - w).pow(2).sum()
    assert mse(searched, weight_qparams(w, bits, symmetric)[1]) <= mse(scale, zero) + 1e-9


def test_known_tensor_exact_and_clipped():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0])
    scale, zero = act_qparams(-1.0, 1.0, None, 8, True, "minmax")
    out = fake_quant(x, scale, zero, *qrange(8, True))
    torch.testing.assert_close(out[:6], x[:6], atol=float(scale) / 2, rtol=0)
    assert float(out[6]) == pytest.approx(1.0)  # beyond the range: clipped to the top level
    lo, hi = -0.3, 2.0  # asymmetric: zero exactly representable
    s, z = act_qparams(lo, hi, None, 4, False, "minmax")
    assert float(fake_quant(torch.zeros(1), s, z, *qrange(4, False))) == 0.0


def test_per_token_and_mse_range():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 6)[:, None]
    s, z = token_qparams(x, 4, True)
    assert bool(((fake_quant(x, s, z, *qrange(4, True)) - x).abs() <= s / 2 + 1e-6).all())
    samples = torch.cat([torch.randn(4000), torch.tensor([60.0])])  # one outlier
    mse_scale, _ = act_qparams(float(samples.min()), float(samples.max()), samples, 4, True, "mse")
    mm_scale, _ = act_qparams(float(samples.min()), float(samples.max()), samples, 4, True, "minmax")
    assert float(mse_scale) < float(mm_scale) / 3  # MSE search clips the outlier at 4 bits


def test_lsq_step_gradient():
    x = torch.tensor([0.26, -0.74, 5.0])
    s = torch.tensor(0.5, requires_grad=True)
    fake_quant(x, s, torch.tensor(0.0), -7, 7).sum().backward()
    expected = (torch.round(x[:2] / 0.5) - x[:2] / 0.5).sum() + 7  # LSQ: residual inside, qmax when clipped
    assert float(s.grad) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_int4_packing_round_trip(k):
    q = torch.randint(-8, 8, (3, k), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (3, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, k), q)
    with pytest.raises(ValueError, match=r"values must lie in \[-8, 7\]"):
        pack_int4(torch.full((1, 2), 9, dtype=torch.int8))


# -- integer kernels ----------------------------------------------------------------------------


def _random_layer(
    k: int, n: int, w_bits: int, a_bits: int, w_sym: bool, a_sym: bool, dynamic: bool
) -> QuantLinear:
    gen = torch.Generator().manual_seed(k * n + w_bits)
    linear = torch.nn.Linear(k, n)
    linear.weight.data = torch.randn(n, k, generator=gen) * 0.1
    spec = LayerSpec(k, n, w_bits, a_bits, w_sym, a_sym, dynamic, True)
    ws, wz = weight_qparams(linear.weight, w_bits, w_sym)
    static = not dynamic and a_bits < 16
    a_scale, a_zero = act_qparams(-2.0, 3.0, None, a_bits, a_sym, "minmax") if static else (None, None)
    return LSQLinear(linear, spec, ws, wz, a_scale, a_zero).freeze()


# Tolerance: both paths use the same integers; only float summation order differs (fp32, K <= 200).
KERNEL_RTOL = 1e-5


@pytest.mark.parametrize("k,n,m", [(40, 72, 97), (128, 384, 200), (200, 24, 17), (16, 16, 3)])
@pytest.mark.parametrize(
    "bits,w_sym,a_sym,dynamic",
    [
        ((8, 8), True, False, False),
        ((8, 8), False, True, False),
        ((4, 8), True, False, False),
        ((4, 4), False, False, False),
        ((8, 8), True, True, True),
        ((4, 4), True, False, True),
    ],
)
def test_int_mm_matches_fake_quant(k, n, m, bits, w_sym, a_sym, dynamic):
    layer = _random_layer(k, n, *bits, w_sym, a_sym, dynamic)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(3)) * 1.5
    reference = layer(x)  # "fake": dequantize, float matmul
    layer.set_kernel("int_mm")  # where int_mm's products saturate (no VNNI), the layer falls back
    assert layer.kernel == "int_mm" or kernels.wrong_results("int_mm", torch.device("cpu"))
    out = layer(x)
    assert out.shape == (2, m, n)
    assert float((out - reference).abs().max()) <= KERNEL_RTOL * float(reference.abs().max())


@pytest.fixture
def fresh_kernel_checks(monkeypatch):
    """Integer kernels re-checked (and their warnings re-armed) inside the test."""
    monkeypatch.setattr(kernels, "_WRONG", {})
    monkeypatch.setattr(kernels, "_WARNED", set())


@pytest.mark.skipif(
    not hasattr(torch.ops.onednn, "qlinear_pointwise"), reason="no oneDNN qlinear in this build"
)
def test_onednn_matches_fake_quant(fresh_kernel_checks, recwarn):
    """On a VNNI/AMX CPU oneDNN runs and is exact; where its products saturate (AVX2), the layer
    falls back with one warning and still computes the quantized model's values."""
    layer = _random_layer(128, 72, 8, 8, True, False, False)
    x = torch.randn(97, 128, generator=torch.Generator().manual_seed(4))
    reference = layer(x)
    layer.set_kernel("onednn")
    assert float((layer(x) - reference).abs().max()) <= KERNEL_RTOL * float(reference.abs().max())
    wrong = kernels.wrong_results("onednn", torch.device("cpu"))
    warned = [w for w in recwarn.list if "cannot be used on this machine" in str(w.message)]
    assert (layer.kernel == "onednn") == (wrong is None)
    assert len(warned) == (wrong is not None)
    with pytest.raises(ValueError, match="oneDNN qlinear takes symmetric 8-bit weights"):
        _random_layer(16, 16, 4, 8, True, False, False).set_kernel("onednn")


def _saturating_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What ``vpmaddubsw`` computes without VNNI: s8 activations shifted to u8, adjacent u8 x s8
    products summed in saturating int16, the shift compensated afterwards."""
    u = a.long() + 128  # (M, K)
    w = b.long().t()  # (N, K)
    if u.shape[1] % 2:
        u, w = torch.nn.functional.pad(u, (0, 1)), torch.nn.functional.pad(w, (0, 1))
    pairs = (u[:, None, 0::2] * w[None, :, 0::2] + u[:, None, 1::2] * w[None, :, 1::2]).clamp(-32768, 32767)
    return (pairs.sum(-1) - 128 * w.sum(1)).to(torch.int32)


def _failed_fused_build(monkeypatch) -> None:
    failing = CppExtension("cpu_int8_linear.cpp", "the fused CPU int8 linear", "the unfused int8 path")

    def no_compiler():
        raise RuntimeError("no C++ compiler found")

    failing.build = no_compiler
    monkeypatch.setattr(cpu_int8_linear, "EXTENSION", failing)


def test_saturating_int8_kernel_is_caught_and_replaced(fresh_kernel_checks, monkeypatch):
    """The once-per-process probe finds a kernel whose products saturate, even when ordinary inputs
    happen to come out right, and every path (explicit kernel, auto choice) avoids it. (The emulation
    replaces torch._int_mm for Python callers; the fused C++ kernel is taken out of the choice here and
    checked against really saturating oneDNN in test_int8_kernels_correct_without_vnni.)"""
    monkeypatch.setattr(torch, "_int_mm", _saturating_int_mm)
    _failed_fused_build(monkeypatch)
    cpu = torch.device("cpu")
    assert "off by up to" in kernels.wrong_results("int_mm", cpu)
    spec = LayerSpec(40, 24, 4, 8, True, False, False, True)  # W4A8: only int_mm could run it
    assert kernels.fallback_kernel(spec, cpu) == "fake"
    layer = _random_layer(40, 24, 4, 8, True, False, False)
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(5))
    reference = layer(x)
    with pytest.warns(RuntimeWarning, match=r"'int_mm' int8 kernel cannot be used on this machine.*'fake'"):
        layer.set_kernel("int_mm")
    assert layer.kernel == "fake" and torch.equal(layer(x), reference)
    timings = kernels.measure(layer, rows=16, repeats=1)
    assert "int_mm" not in timings and kernels.fastest(timings) == "fake"


_NO_VNNI_SCRIPT = """
import warnings, torch
from accel.quant import kernels
from test_quest import _random_layer
assert kernels.int8_isa() == "no_vnni", kernels.int8_isa()
layer = _random_layer(128, 72, 8, 8, True, False, False)
x = torch.randn(97, 128, generator=torch.Generator().manual_seed(4))
reference = layer(x)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for kernel in ("onednn", "int_mm", "fused", "onednn"):
        layer.set_kernel(kernel)
        err = float((layer(x) - reference).abs().max()) / float(reference.abs().max())
        assert err <= 1e-5, (kernel, layer.kernel, err)
        assert layer.kernel == kernel or kernels.wrong_results(kernel, torch.device("cpu")), kernel
print(layer.kernel, sum("cannot be used on this machine" in str(w.message) for w in caught))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    kernels.int8_isa() == "unknown" or not hasattr(torch.ops.onednn, "qlinear_pointwise"),
    reason="needs an x86 CPU with oneDNN",
)
def test_int8_kernels_correct_without_vnni():
    """oneDNN capped at AVX2 (as on CPUs without VNNI) reproduces the saturating products; the
    kernels are caught and quantized layers keep their exact values, with one warning per kernel."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", _NO_VNNI_SCRIPT],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    kernel, warnings_seen = out.stdout.split()[-2:]
    # Each wrong kernel warns once, however often it is asked for.
    assert int(warnings_seen) <= 3 and (kernel == "onednn") == (warnings_seen == "0")


def _needs_fused() -> None:
    if not cpu_int8_linear.available():
        pytest.skip(f"the fused int8 kernel did not build: {cpu_int8_linear.unavailable_reason()}")
    why = kernels.wrong_results("fused", torch.device("cpu"))
    if why is not None:  # e.g. oneDNN without VNNI: caught by the probe, covered by the fallback tests
        pytest.skip(f"the fused int8 kernel is not exact on this CPU: {why}")


@pytest.mark.parametrize("m,k,n", [(1, 72, 40), (97, 200, 72), (97, 72, 130), (3, 201, 9)])
@pytest.mark.parametrize("w_bits,a_bits,w_sym,a_sym,dynamic", [
    (8, 8, True, False, False), (8, 8, True, True, True), (4, 8, False, False, False),
    (4, 4, True, False, True), (8, 8, False, False, True),
])
def test_fused_kernel_equals_integer_reference(m, k, n, w_bits, a_bits, w_sym, a_sym, dynamic):
    """The fused kernel's int32 accumulators equal sum (qx - zx)(qw - zw) computed in int64 from the
    reference quantizers, bit for bit, at awkward shapes (odd K for packed 4-bit, M = 1, N off the
    column tiles), static and dynamic scales; its float output is the reference's rescale."""
    _needs_fused()
    layer = _random_layer(k, n, w_bits, a_bits, w_sym, a_sym, dynamic)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k + n)) * 2
    qx, scale, zero = layer.quantize_input(x)
    qw = layer.int_weight().long()
    exact = (qx.long() - zero.round().long()) @ (qw - layer.w_zero.long()[:, None]).t()
    colsum = layer.int_weight().sum(1, dtype=torch.int32)
    qmin, qmax = qrange(a_bits, a_sym)
    for tile in (0, 64):  # one GEMM, and several column tiles
        acc = cpu_int8_linear.int8_linear(
            x, layer.qweight, k, layer.w_scale, layer.w_zero, colsum, layer.bias, (qmin, qmax), a_sym,
            None if dynamic else float(layer.a_scale), 0.0 if dynamic else float(layer.a_zero),
            tile_n=tile, accumulators=True,
        )
        assert torch.equal(acc.long(), exact), tile
    layer.set_kernel("fused")
    expected = exact.double() * scale.double() * layer.w_scale.double() + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-5)


def test_fused_kernel_takes_bf16_activations():
    """From bf16 activations the fused layer quantizes the bf16 values themselves (no fp32 copy of the
    input is needed) and returns bf16: the float result of the same integers, rounded once."""
    _needs_fused()
    layer = _random_layer(128, 72, 8, 8, True, False, False)
    x = torch.randn(2, 17, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    layer.set_kernel("fused")
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 17, 72)
    assert torch.equal(out, layer(x.float()).bfloat16())


@pytest.mark.parametrize("k,n,w_bits", [(72, 40, 4), (201, 300, 4), (128, 72, 8)])
def test_weight_only_layer_unpacks_per_tile_and_matches_reference(k, n, w_bits):
    """W4A16: activations stay float; the fused path dequantizes the packed weight one column tile at a
    time and equals the dequantized-weight matmul (up to summation order, or bf16 rounding where the GEMM
    runs in bf16: always from bf16 inputs, and from fp32 inputs on CPUs with native bf16)."""
    _needs_fused()
    layer = _random_layer(k, n, w_bits, 16, False, False, False)
    assert layer.spec.weight_only and layer.a_scale is None
    assert layer.qweight.dtype == (torch.uint8 if w_bits == 4 else torch.int8)
    x = torch.randn(3, 33, k, generator=torch.Generator().manual_seed(k))
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), reference)  # fake
    layer.set_kernel("fused")
    if kernels.native_bf16():  # 16-bit activations: fp32 inputs run the bf16 GEMM, output back in fp32
        out = layer(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference, rtol=0.02, atol=0.02 * float(reference.abs().max()))
    else:
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.02, atol=0.05 * float(reference.abs().max()))
    with pytest.raises(ValueError, match="weight-only layers"):
        layer.set_kernel("int_mm")


def test_fused_kernel_falls_back_when_it_does_not_build(fresh_kernel_checks, monkeypatch):
    """No compiler: layers asked for ``fused`` run the next correct integer kernel, with one warning that
    says why, and the auto choice never offers it."""
    _failed_fused_build(monkeypatch)
    cpu = torch.device("cpu")
    assert "did not build (RuntimeError: no C++ compiler found)" in kernels.wrong_results("fused", cpu)
    layer = _random_layer(40, 24, 8, 8, True, False, False)
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(5))
    reference = layer(x)
    with pytest.warns(RuntimeWarning, match=r"'fused' int8 kernel cannot be used on this machine "
                                            r"\(it did not build.*run '(int_mm|onednn|fake)'"):
        layer.set_kernel("fused")
    layer.set_kernel("fused")  # warned once per process
    assert layer.kernel != "fused"
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    assert "fused" not in kernels.measure(layer, rows=16, repeats=1)


def test_lsq_layer_equals_frozen_layer():
    linear = torch.nn.Linear(24, 8)
    spec = LayerSpec(24, 8, 4, 8, False, False, False, True)
    ws, wz = weight_qparams(linear.weight, 4, False)
    lsq = LSQLinear(linear, spec, ws, wz, *act_qparams(-1.0, 1.0, None, 8, False, "minmax"))
    x = torch.randn(10, 24)
    with torch.no_grad():
        assert torch.equal(lsq(x), lsq.freeze()(x))


def test_kernel_measurement_picks_a_correct_kernel():
    layer = _random_layer(128, 128, 8, 8, True, False, False)
    timings = kernels.measure(layer, rows=64, repeats=2)
    assert {"fp32", "bf16", "fake"} <= set(timings)
    assert ("int_mm" in timings) == kernels.runnable("int_mm", layer.spec, torch.device("cpu"))
    assert kernels.fastest(timings) in kernels.KERNELS


# -- calibration --------------------------------------------------------------------------------


def test_calibration_covers_all_timesteps():
    pipe = TinyPipe(layers=2)
    calib = quest.calibrate(pipe, _config(calib_steps=6), progress=False)
    pipe.scheduler.set_timesteps(6)
    assert calib.timesteps == sorted((float(t) for t in pipe.scheduler.timesteps), reverse=True)
    assert all(obs.steps == set(range(6)) for obs in calib.observers.values())
    assert len(calib.observers) == sum(isinstance(m, torch.nn.Linear) for m in pipe.transformer.modules())
    assert all(obs.samples.numel() <= obs.size for obs in calib.observers.values())  # bounded memory
    one = quest.calibrate(pipe, _config(calib_steps=6), steps=[0], progress=False)
    assert len(one.timesteps) == 1 and set(one.recorded_steps) == {0}


# -- selective finetuning: a hand-made model where the answer is known ---------------------------


class HandMade(torch.nn.Module):
    """x (B, N, 8) and a timestep. ``time_fc`` sees (B, 8) conditioning vectors (temporal). ``fc_b``'s
    input has one channel 200x larger than the rest (``fc_a`` scales it up, ``fc_b`` back down), so
    the float function is ordinary but per-tensor 4-bit activations wipe out ``fc_b``'s other inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.time_fc = torch.nn.Linear(8, 8)
        self.fc_a, self.fc_b, self.fc_c = (torch.nn.Linear(8, 8) for _ in range(3))
        with torch.no_grad():
            self.fc_a.weight[0] *= 200
            self.fc_a.bias[0] *= 200
            self.fc_b.weight[:, 0] /= 200

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(4) + 1.0
        emb = torch.cat(
            [torch.sin(timestep[:, None] * freqs / 1000), torch.cos(timestep[:, None] * freqs / 1000)], 1
        )
        h = self.fc_a(x) + self.time_fc(emb)[:, None]
        return self.fc_c(torch.relu(self.fc_b(h)))


class _StubAdapter:
    timestep_arg = "timestep"
    is_denoiser = True

    def timestep(self, args, kwargs):
        return kwargs.get("timestep")


def test_selective_layers_found_on_hand_made_model():
    model = HandMade().eval()
    gen = torch.Generator().manual_seed(0)
    calls = [
        ((torch.randn(2, 6, 8, generator=gen),), {"timestep": torch.full((2,), float(t))})
        for t in (900, 500, 100)
    ]
    calib = collect(
        model, _StubAdapter(), [lambda a=a, k=k: model(*a, **k) for a, k in calls], progress=False
    )
    temporal = temporal_layers({n: o.token_input for n, o in calib.observers.items()}, True)
    assert temporal == ["time_fc"]
    config = quest.QuESTConfig(bits="w8a8", act_symmetric=True, act_range="minmax")
    lsq = lsq_layers(model, config.replace(bits="w4a4", first_last_8bit=False), calib, list(calib.observers))
    scores = sensitivity(model, lsq, calib.inputs, teacher_outputs(model, calib.inputs), progress=False)
    assert pick_sensitive(scores, 1, exclude=temporal) == ["fc_b"]
    assert {n: type(m) for n, m in model.named_children()} == {
        n: torch.nn.Linear for n in ("time_fc", "fc_a", "fc_b", "fc_c")
    }


def test_finetune_reduces_error_and_freezes_the_rest():
    pipe = TinyPipe(layers=2)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = _config(bits="w4a4", finetune_iters=30, lr=1e-3, step_lr=1e-2)
    calib = quest.calibrate(pipe, config, progress=False)
    qm = quest.finetune(pipe, calib, config, progress=False)
    facts = qm.meta["finetune"]
    assert facts["iters"] == 30 and facts["loss_last"] < facts["loss_first"]
    assert set(qm.meta["temporal"]) <= set(qm.meta["finetuned"])
    assert any(name.endswith("norm1.linear") for name in qm.meta["temporal"])
    assert len(qm.meta["sensitive"]) == 2 and not set(qm.meta["sensitive"]) & set(qm.meta["temporal"])
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the fp32 model is untouched
    assert all(p.requires_grad for p in pipe.transformer.parameters())


# -- patching, artifacts, removal ----------------------------------------------------------------


def _run(pipe: TinyPipe) -> torch.Tensor:
    return pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(5))


def test_patch_quantizes_and_remove_restores_exactly():
    pipe = TinyPipe(layers=2)
    model = pipe.transformer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    keys = set(model.__dict__)
    reference = _run(pipe)
    with accel.patch(pipe, _config(bits="w4a8")) as patch:
        assert all(
            isinstance(m, QuantLinear) for n, m in model.named_modules() if n in quest.linear_names(modules)
        )
        out = _run(pipe)
        report = patch.report().methods["quest"]
    assert not torch.equal(out, reference) and float((out - reference).abs().mean()) < 0.5
    assert report["bits"] == {"w4a8": 20}  # 9 linear layers per block + 2 output layers
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert set(model.__dict__) == keys
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(_run(pipe), reference)


def test_weight_only_patch_needs_no_calibration_and_saves_bytes():
    """W4A16 on a pipeline: no calibration run (no activation ranges), every linear layer packed to 4 bits
    (an eighth of its fp32 weight bytes), outputs near the float model's, and removal exact."""
    pipe = TinyPipe(layers=2)
    reference = _run(pipe)
    config = _config(bits="w4a16")
    assert not config.needs_calibration
    with accel.patch(pipe, config) as patch:
        layers = [m for m in pipe.transformer.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.qweight.dtype == torch.uint8 and m.a_scale is None for m in layers)
        assert all(m.qweight.numel() * 2 <= (m.spec.in_features + 1) * m.spec.out_features for m in layers)
        out = _run(pipe)
        report = patch.report().methods["quest"]
    assert report["bits"] == {"w4a16": 20}
    assert float((out - reference).abs().mean()) < 0.5 and not torch.equal(out, reference)
    assert torch.equal(_run(pipe), reference)


def test_whole_model_without_gain_keeps_every_layer_float(monkeypatch):
    """Per-layer timings can promise a gain the whole model does not show: when the model with its integer
    layers is not faster than the float model on a recorded call, every layer stays float and the report
    says why; the output is then the float model's."""
    monkeypatch.setattr(kernels, "float_is_faster", lambda timings, kernel: kernel == "fake")  # layers gain
    slower = {"float_s": 1.0, "quantized_s": 1.1, "speedup": 0.91}
    monkeypatch.setattr(workflow, "whole_model_speed", lambda model, layers, call, repeats=3: slower)
    pipe = TinyPipe(layers=2)
    reference = _run(pipe)
    with accel.patch(pipe, _config(keep_float_when_faster=True)) as patch:
        assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
        report = patch.report().methods["quest"]
        assert torch.equal(_run(pipe), reference)
    assert "0.91x its float speed" in report["whole_model_check"] and "every layer stays float" in \
        report["whole_model_check"]
    assert "no layer is quantized" in report["warning"]


def test_whole_model_speed_times_both_ways():
    pipe = TinyPipe(layers=1)
    model = pipe.transformer
    qm = quest.quantize(pipe, _config(keep_float_when_faster=False), progress=False)
    x = torch.randn(2, 1, 8, 8)
    call = ((x,), {"timestep": torch.tensor([500, 500]), "class_labels": torch.tensor([1, 2])})
    result = workflow.whole_model_speed(model, qm.layers, call, repeats=1)
    assert result["float_s"] > 0 and result["quantized_s"] > 0
    assert result["speedup"] == pytest.approx(result["float_s"] / result["quantized_s"], rel=1e-3)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n in qm.layers)  # restored


def test_save_load_bit_identical_and_mismatch_refused(tmp_path):
    pipe = TinyPipe(layers=2)
    config = _config(bits="w4a4", finetune_iters=5)
    qm = quest.quantize(pipe, config, progress=False)
    folder = qm.save(tmp_path / "art")
    assert (folder / "quest.json").is_file() and (folder / "quest.safetensors").is_file()
    loaded = quest.load(str(folder))
    for name, layer in qm.layers.items():
        other = loaded.layers[name]
        assert layer.kernel == other.kernel and layer.spec == other.spec
        assert all(
            torch.equal(a, b) for a, b in zip(layer.state_dict().values(), other.state_dict().values())
        )
    assert loaded.meta["finetuned"] == qm.meta["finetuned"]
    assert any(layer.qweight.dtype == torch.uint8 for layer in loaded.layers.values())  # packed int4
    outputs = []
    for _ in range(2):
        with accel.patch(pipe, config.replace(artifact=str(folder))):
            outputs.append(_run(pipe))
    assert torch.equal(outputs[0], outputs[1])
    with accel.patch(pipe.transformer, config.replace(artifact=str(folder))):  # bare model: same layers
        x = torch.randn(2, 1, 8, 8)
        t, labels = torch.tensor([500, 500]), torch.tensor([1, 2])
        assert torch.equal(
            pipe.transformer(x, timestep=t, class_labels=labels).sample,
            _layers_forward(pipe.transformer, qm, x, t, labels),
        )
    other = TinyPipe(layers=2)
    other.transformer = tiny_dit(2, seed=1)
    with pytest.raises(accel.ArtifactMismatchError, match=r"belongs to model .* \(the weights differ\)"):
        accel.patch(other, config.replace(artifact=str(folder)))
    with pytest.raises(accel.ArtifactMismatchError, match=r"the architecture differ"):
        accel.patch(TinyPipe(layers=3), config.replace(artifact=str(folder)))
    with pytest.raises(
        accel.ArtifactMismatchError, match=r"holds a w4a4 model but the config asks for bits='w8a8'"
    ):
        accel.patch(pipe, config.replace(bits="w8a8", artifact=str(folder)))
    assert accel.active_patch(other) is None and accel.active_patch(pipe) is None
    with pytest.raises(FileNotFoundError, match="No QuEST artifact"):
        accel.patch(pipe, config.replace(artifact=str(tmp_path / "nothing")))


def _layers_forward(model, qm, x, t, labels):
    from accel.quant.finetune import swapped

    with swapped(model, qm.layers), torch.no_grad():
        return model(x, timestep=t, class_labels=labels).sample


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bits", "w3a8", r"QuESTConfig.bits must be one of 'w8a8', 'w4a8', 'w4a4', 'w4a16', got 'w3a8'"),
        (
            "act_granularity",
            "per_row",
            r"QuESTConfig.act_granularity must be one of 'per_tensor', 'per_token'",
        ),
        ("weight_granularity", "per_group", r"QuESTConfig.weight_granularity must be one of 'per_channel'"),
        ("act_range", "max", r"QuESTConfig.act_range must be one of 'minmax', 'percentile', 'mse'"),
        ("kernel", "cuda", r"QuESTConfig.kernel must be one of 'auto', 'fused', 'int_mm', 'onednn', 'fake'"),
        ("percentile", 20.0, r"QuESTConfig.percentile must be in \[50.0, 100.0\], got 20.0"),
        (
            "finetune_iters",
            -1,
            r"QuESTConfig.finetune_iters must be an int >= 0, got -1. Use 0 for plain PTQ.",
        ),
    ],
)
def test_bad_configs(field, value, match):
    with pytest.raises(ValueError, match=match):
        quest.QuESTConfig(**{field: value})


def test_bad_config_by_name_and_bare_model_without_data():
    with pytest.raises(ValueError, match=r"QuESTConfig.bits must be one of .* got 'w3a8'"):
        accel.patch(TinyPipe(layers=1), "quest:bits=w3a8")
    model = tiny_dit(1)
    with pytest.raises(
        accel.UnsupportedModelError, match=r"QuEST on a bare DiTTransformer2DModel cannot calibrate"
    ):
        accel.patch(model, quest.QuESTConfig())
    assert accel.active_patch(model) is None


def test_fake_kernel_is_reported():
    pipe = TinyPipe(layers=1)
    with accel.patch(pipe, _config(kernel="fake")) as patch:
        facts = patch.report().methods["quest"]
    assert facts["kernels"] == {"fake": 11}
    assert "run fake-quant" in facts["warning"]


# -- timm ViT -----------------------------------------------------------------------------------


def _vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
    ).eval()


def test_timm_vit_dynamic_without_data_and_calibrated_with_images(tmp_path):
    model = _vit()
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dynamic = quest.QuESTConfig(act_granularity="per_token", finetune_iters=0, keep_float_when_faster=False)
    with accel.patch(model, dynamic) as patch:
        with torch.no_grad():
            out = model(images)
        assert patch.report().methods["quest"]["bits"]["w8a8"] == 9
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    with pytest.raises(accel.UnsupportedModelError, match="bare VisionTransformer cannot calibrate"):
        accel.patch(model, quest.QuESTConfig())
    config = quest.QuESTConfig(bits="w4a8", finetune_iters=10, sensitive_layers=2, max_inputs=4)
    calib = quest.calibrate(model, config, images=images, batch_size=4, progress=False)
    qm = quest.finetune(model, calib, config, progress=False)
    assert qm.meta["temporal"] == []  # a classifier has no timestep path
    qm.save(tmp_path / "vit")
    with accel.patch(model, config.replace(artifact=str(tmp_path / "vit"))), torch.no_grad():
        assert model(images).shape == reference.shape
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_import_stays_lean():
    code = (
        "import sys, accel, accel.methods.quest, accel.quant.kernels; "
        "bad = [m for m in ('triton', 'torchao') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_keeps_layers_in_float_where_no_integer_kernel_helps(monkeypatch):
    """Speed first: layers no integer kernel speeds up (fake-quant chosen) stay nn.Linear, said in the
    report; keep_float_when_faster=False quantizes them all. Timings are stubbed: the choice is tested."""
    real_measure = kernels.measure

    def measure(layer, rows, *args, **kw):
        timings = real_measure(layer, rows, *args, repeats=1, **kw)
        small = layer.spec.out_features < 64  # the "too small to gain" shapes of this test
        timings.update(fp32=1.0, bf16=1.0, float=1.0, fake=1.5, int_mm=2.0 if small else 0.5,
                       fused=2.0 if small else 0.4)
        timings.pop("onednn", None)
        return timings

    monkeypatch.setattr(kernels, "measure", measure)
    # int_mm counts as correct here; fused as it really is (it may not build without a compiler)
    fused = kernels.wrong_results("fused", torch.device("cpu"))
    monkeypatch.setattr(kernels, "_WRONG", {("int_mm", "cpu"): None, ("fused", "cpu"): fused})
    checked = []

    def whole_model_speed(model, layers, call, repeats=3):
        checked.append(set(layers))
        return {"float_s": 2.0, "quantized_s": 1.0, "speedup": 2.0}  # the whole model gains: layers stay

    monkeypatch.setattr(workflow, "whole_model_speed", whole_model_speed)
    pipe = TinyPipe(layers=2)
    model = pipe.transformer
    reference = _run(pipe)
    with accel.patch(pipe, _config(keep_float_when_faster=True)) as patch:
        kinds = {n: type(m) for n, m in model.named_modules()
                 if isinstance(m, (torch.nn.Linear, QuantLinear))}
        report = patch.report().methods["quest"]
    small = {n for n, k in kinds.items() if k is torch.nn.Linear}
    assert checked == [set(kinds) - small]  # the whole-model check ran the layers the per-layer rule kept
    assert report["whole_model_check"].startswith("with its integer layers the model ran 2.00x")
    assert small and len(small) < len(kinds)
    assert all(model.get_submodule(n).out_features < 64 for n in small)
    assert report["kept_float"].startswith(
        f"{len(small)} of {len(kinds)} layers kept in fp32: too small to gain")
    assert torch.equal(_run(pipe), reference)
    with accel.patch(pipe, _config(keep_float_when_faster=False)) as patch:
        assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n in kinds)
        assert "kept_float" not in patch.report().methods["quest"]
