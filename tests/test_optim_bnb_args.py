"""ftkernels.optim's constructors take bitsandbytes' arguments (optim/optimizers.py): the same
signatures as bitsandbytes 0.50's same-named classes, each argument's meaning (against
bitsandbytes on the CPU where it has one, else a torch reference), and each refusal."""

from __future__ import annotations

import inspect
import io
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ftkernels.optim import AdamW, AdamW8bit, Lion, PagedAdamW, PagedAdamW8bit, PagedLion

from conftest import cuda_only, raise_bad_call

CLASSES = [AdamW, AdamW8bit, Lion, PagedAdamW, PagedAdamW8bit, PagedLion]
# Keyword-only, after bitsandbytes 0.50's parameters: bitsandbytes up to 0.49 had them (0.50 dropped them).
EXTRAS = {"percentile_clipping": 100, "block_wise": True}


def _bnb_optim():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes.optim")


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def _grads(shapes, steps, seed=1, scales=None):
    g = torch.Generator().manual_seed(seed)
    scales = scales or [1.0] * steps
    return [[torch.randn(*s, generator=g) * scales[t] for s in shapes] for t in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _state_layout(opt, params):
    """Per parameter: the state tensors' (dtype, numel), sorted; bitsandbytes' shared 8-bit maps left out."""
    return [
        sorted(
            (str(t.dtype), t.numel())
            for k, t in opt.state[p].items()
            if isinstance(t, torch.Tensor) and "qmap" not in k
        )
        for p in params
    ]


# ---- signatures ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_signature_is_bitsandbytes_then_two_keyword_only_extras(cls):
    ref = list(inspect.signature(getattr(_bnb_optim(), cls.__name__)).parameters.values())
    ours = list(inspect.signature(cls).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(ref)]] == [(p.name, p.kind, p.default) for p in ref]
    extras = ours[len(ref) :]
    assert {p.name: p.default for p in extras} == EXTRAS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)


def test_bitsandbytes_positional_calls():
    p = _params([(8,)])
    opt = AdamW8bit(p, 1e-3, (0.9, 0.999), 1e-8, 1e-2)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["weight_decay"] == 1e-2
    # params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged
    opt = AdamW(p, 1e-2, (0.8, 0.9), 1e-6, 0.0, False, 8, None, 4, True)
    assert (opt.optim_bits, opt.min_8bit_size, opt.is_paged) == (8, 4, True)
    # params, lr, betas, weight_decay, optim_bits, args, min_8bit_size
    opt = PagedLion(p, 1e-4, (0.9, 0.99), 0.1, 32, None, 16)
    assert (opt.optim_bits, opt.min_8bit_size, opt.is_paged) == (32, 16, True)


# ---- meanings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kw,atol",
    [
        ("AdamW", {}, 1e-6),
        ("AdamW", {"optim_bits": 8}, 5e-4),
        ("AdamW8bit", {"min_8bit_size": 1000}, 5e-4),
        ("Lion", {"weight_decay": 0.1}, 0.0),
        ("PagedAdamW8bit", {}, 5e-4),
    ],
)
def test_steps_and_state_sizes_match_bitsandbytes_on_the_cpu(name, kw, atol):
    # 5 steps of lr 1e-3 move a weight ~5e-3; bitsandbytes' CPU build picks approximate 8-bit
    # codes (docs/ARCHITECTURE.md), so 8-bit runs agree to ~2e-4, 32-bit ones to rounding.
    bnb_optim = _bnb_optim()
    shapes = [(40, 32), (999,), (1000,), (30,)]  # 8-bit from 1280 elements (4096) or 1000 (min_8bit_size=1000)
    grads = _grads(shapes, 5)
    ours_p, ref_p = _params(shapes), _params(shapes)
    ours = getattr(__import__("ftkernels").optim, name)(ours_p, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes: "Paged optimizers are not supported on CPU"
        ref = getattr(bnb_optim, name)(ref_p, **kw)
        ref_out = _run(ref, ref_p, grads)
    for a, b in zip(_run(ours, ours_p, grads), ref_out):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    assert _state_layout(ours, ours_p) == _state_layout(ref, ref_p)


def test_min_8bit_size_is_the_threshold_for_8bit_states():
    p = _params([(4095,), (4096,), (10,)])
    for opt, small in ((AdamW(p, optim_bits=8), 4096), (AdamW8bit(p, min_8bit_size=10), 10)):
        _run(opt, p, _grads([t.shape for t in p], 1))
        for t in p:
            assert (opt.state[t].get("state1", opt.state[t].get("exp_avg")).dtype == torch.uint8) == (
                t.numel() >= small
            )


def test_optim_bits_8_is_adamw8bit_and_32_is_adamw():
    shapes = [(64, 80), (7,)]
    grads = _grads(shapes, 3)
    runs = {}
    for key, make in {
        "adamw8": lambda ps: AdamW(ps, optim_bits=8),
        "adamw8bit": AdamW8bit,
        "adamw32": lambda ps: AdamW(ps, optim_bits=32),
        "adamw": AdamW,
    }.items():
        p = _params(shapes)
        runs[key] = _run(make(p), p, grads)
    for a, b in zip(runs["adamw8"], runs["adamw8bit"]):
        assert torch.equal(a, b)
    for a, b in zip(runs["adamw32"], runs["adamw"]):
        assert torch.equal(a, b)
    assert not torch.equal(runs["adamw8"][0], runs["adamw"][0])


@pytest.mark.parametrize("cls", [AdamW, AdamW8bit, Lion], ids=lambda c: c.__name__)
def test_is_paged_is_the_paged_class(cls):
    paged_cls = {AdamW: PagedAdamW, AdamW8bit: PagedAdamW8bit, Lion: PagedLion}[cls]
    assert cls(_params([(3,)]), is_paged=True).is_paged and paged_cls(_params([(3,)])).is_paged
    assert not cls(_params([(3,)])).is_paged
    shapes = [(64, 80)]
    grads = _grads(shapes, 3)
    a, b = _params(shapes), _params(shapes)
    for x, y in zip(_run(cls(a, is_paged=True), a, grads), _run(paged_cls(b), b, grads)):  # on the CPU: unpaged
        assert torch.equal(x, y)


@cuda_only
@pytest.mark.cuda
def test_is_paged_puts_cuda_states_in_managed_memory():
    from ftkernels.optim import paged_bytes_in_use

    before = paged_bytes_in_use()
    model = nn.Linear(256, 64).cuda()
    opt = AdamW(model.parameters(), optim_bits=8, is_paged=True, percentile_clipping=50)
    model(torch.randn(8, 256, device="cuda")).square().mean().backward()
    opt.step()
    opt.step()  # the second step prefetches the states; the clipping window is not paged
    want = sum(
        t.numel() * t.element_size()
        for st in opt.state.values()
        for k, t in st.items()
        if k not in ("step", "gnorm_vec")
    )
    assert paged_bytes_in_use() - before == want > 0
    assert all(st["gnorm_vec"].device.type == "cuda" for st in opt.state.values())


def _args(**kw):
    return SimpleNamespace(**{"optim_bits": 32, "min_8bit_size": 4096, "max_unorm": 0.0, "skip_zeros": False, **kw})


def test_args_namespace_replaces_the_keywords_as_in_bitsandbytes():
    bnb_optim = _bnb_optim()
    shapes = [(300,), (20,)]
    for cls, kw, args in (
        (AdamW, {"optim_bits": 32, "min_8bit_size": 4096}, _args(optim_bits=8, min_8bit_size=256)),
        (AdamW8bit, {"min_8bit_size": 1}, _args(optim_bits=32)),  # bitsandbytes reads optim_bits from args here too
        (Lion, {}, _args(min_8bit_size=1)),
    ):
        ours_p, ref_p = _params(shapes), _params(shapes)
        ours = cls(ours_p, args=args, **kw)
        ref = getattr(bnb_optim, cls.__name__)(ref_p, args=args, **kw)
        grads = _grads(shapes, 1)
        _run(ours, ours_p, grads), _run(ref, ref_p, grads)
        assert _state_layout(ours, ours_p) == _state_layout(ref, ref_p), cls.__name__
    # A namespace of bitsandbytes up to 0.49 also carries percentile_clipping and block_wise.
    opt = AdamW(_params([(3,)]), args=_args(percentile_clipping=5, block_wise=True))
    assert (opt.percentile_clipping, opt.block_wise) == (5, True)


def _bnb_percentile_reference(steps_grads, percentile, lr=1e-2):
    """bitsandbytes' percentile clipping (up to 0.49), restated in torch: per parameter a window
    of 100 squared gradient norms (every slot set on step 1; slot step % 100 afterwards), the
    bound the square root of the window's percentile-th smallest entry, the gradient scaled by
    bound / norm when its norm exceeds it; then a torch.optim.AdamW step."""
    params = _params([g.shape for g in steps_grads[0]])
    opt = torch.optim.AdamW(params, lr=lr)
    windows = [torch.zeros(100) for _ in params]
    for step, gs in enumerate(steps_grads, 1):
        for p, g, w in zip(params, gs, windows):
            sq = g.double().square().sum().float()
            if step == 1:
                w.fill_(sq)
            else:
                w[step % 100] = sq
            norm, bound = w[step % 100].sqrt(), w.sort().values[percentile].sqrt()
            p.grad = g * (bound / norm) if norm > bound else g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("percentile", [0, 5, 50])
def test_percentile_clipping_is_bitsandbytes_rule(percentile):
    # 130 steps wrap the window; the gradients' scales span 3 decades so some steps are clipped.
    shapes = [(16,), (4, 5)]
    scales = torch.logspace(-1.5, 1.5, 130)[torch.randperm(130, generator=torch.Generator().manual_seed(3))]
    grads = _grads(shapes, 130, scales=scales.tolist())
    want = _bnb_percentile_reference(grads, percentile)
    p = _params(shapes)
    opt = AdamW(p, lr=1e-2, percentile_clipping=percentile)
    got = _run(opt, p, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    unclipped = _params(shapes)
    assert not torch.allclose(got[0], _run(AdamW(unclipped, lr=1e-2), unclipped, grads)[0], atol=1e-3)
    assert torch.equal(p[0].grad, grads[-1][0])  # the gradient itself is left as it was


@pytest.mark.parametrize(
    "cls,lr", [(Lion, 1e-3), (AdamW8bit, 1e-3), (PagedAdamW, 1e-3)], ids=["Lion", "AdamW8bit", "PagedAdamW"]
)
def test_percentile_clipping_resumes_bit_identically(cls, lr):
    shapes = [(64, 80), (9,)]
    grads = _grads(shapes, 8, scales=[1.0, 1.0, 30.0, 1.0, 0.1, 50.0, 1.0, 1.0])
    a, b = _params(shapes), _params(shapes)
    opt_a, opt_b = cls(a, lr=lr, percentile_clipping=5), cls(b, lr=lr, percentile_clipping=5)
    _run(opt_a, a, grads[:4])
    _run(opt_b, b, grads[:4])
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    opt_c = cls(b, lr=lr, percentile_clipping=5)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(opt_c.state[b[0]]["gnorm_vec"], opt_b.state[b[0]]["gnorm_vec"])
    for x, y in zip(_run(opt_a, a, grads[4:]), _run(opt_c, b, grads[4:])):
        assert torch.equal(x, y)
    u = _params(shapes)  # clipping changed the run: the 30x and 50x steps were scaled down
    assert not torch.allclose(_run(cls(u, lr=lr), u, grads)[0], a[0], atol=1e-4)


# ---- refusals --------------------------------------------------------------------------------


def _bad_calls():
    p = _params([(10,)])
    return [
        (lambda: AdamW(p, amsgrad=True), ValueError, "AdamW: amsgrad=True is not implemented.*amsgrad=False"),
        (lambda: AdamW8bit(p, amsgrad=True), ValueError, "AdamW8bit: amsgrad=True is not implemented"),
        (lambda: PagedAdamW(p, amsgrad=True), ValueError, "PagedAdamW: amsgrad=True is not implemented"),
        (lambda: AdamW(p, amsgrad=1), TypeError, "amsgrad must be a bool"),
        (lambda: AdamW(p, optim_bits=4), ValueError, "AdamW: optim_bits must be 8 or 32"),
        (lambda: AdamW(p, optim_bits=True), ValueError, "optim_bits must be 8 or 32"),
        (lambda: AdamW8bit(p, optim_bits=8), ValueError, "AdamW8bit: optim_bits must stay 32.*AdamW\\(optim_bits"),
        (lambda: PagedAdamW8bit(p, optim_bits=16), ValueError, "PagedAdamW8bit: optim_bits must stay 32"),
        (lambda: Lion(p, optim_bits=8), ValueError, "Lion: optim_bits=8 \\(8-bit Lion states\\) is not implemented"),
        (lambda: PagedLion(p, optim_bits=8), ValueError, "PagedLion: optim_bits=8.*use optim_bits=32"),
        (lambda: AdamW8bit(p, block_wise=False), ValueError, "block_wise=False.*blockwise only.*block_wise=True"),
        (lambda: AdamW(p, optim_bits=8, block_wise=False), ValueError, "AdamW: block_wise=False"),
        (lambda: AdamW(p, block_wise="no"), TypeError, "block_wise must be a bool"),
        (lambda: AdamW(p, is_paged=1), TypeError, "AdamW: is_paged must be a bool"),
        (lambda: AdamW(p, percentile_clipping=101), ValueError, "percentile_clipping must be an int in \\[0, 100\\]"),
        (lambda: Lion(p, percentile_clipping=-1), ValueError, "Lion: percentile_clipping must be an int"),
        (lambda: AdamW(p, percentile_clipping=5.0), ValueError, "percentile_clipping must be an int"),
        (lambda: AdamW(p, min_8bit_size=1.5), ValueError, "min_8bit_size must be an int >= 0"),
        (
            lambda: AdamW(p, args={"optim_bits": 8}),
            TypeError,
            "args must be an object with attributes.*SimpleNamespace",
        ),
        (lambda: AdamW(p, args=SimpleNamespace(optim_bits=8)), TypeError, "lacks min_8bit_size, max_unorm, skip_zeros"),
        (lambda: AdamW(p, args=_args(max_unorm=1.0)), ValueError, "args.max_unorm=1.0 .* is not implemented"),
        (lambda: AdamW(p, args=_args(max_unorm="x")), TypeError, "args.max_unorm must be a number"),
        (lambda: AdamW(p, args=_args(skip_zeros=True)), ValueError, "args.skip_zeros=True .* is not implemented"),
        (lambda: AdamW(p, args=_args(optim_bits=16)), ValueError, "args.optim_bits must be 8 or 32"),
        (lambda: Lion(p, args=_args(optim_bits=8)), ValueError, "Lion: args.optim_bits=8 .*not implemented"),
        (lambda: AdamW(p, args=_args(min_8bit_size=-1)), ValueError, "args.min_8bit_size must be an int"),
        (lambda: AdamW(p, args=_args(percentile_clipping=200)), ValueError, "args.percentile_clipping must be"),
        (lambda: AdamW(p, args=_args(optim_bits=8, block_wise=False)), ValueError, "args.block_wise=False"),
    ]


_N_BAD = 28


@pytest.mark.parametrize("i", range(_N_BAD))
def test_refusals_name_the_argument_and_what_to_use(i):
    raise_bad_call(_bad_calls(), i, _N_BAD)


def test_what_bitsandbytes_ignores_is_accepted():
    # block_wise only shapes 8-bit states; max_unorm <= 0 is off in bitsandbytes.
    p = _params([(10,)])
    assert AdamW(p, block_wise=False).block_wise is False
    assert Lion(p, block_wise=False, min_8bit_size=0).min_8bit_size == 0
    assert AdamW(p, args=_args(max_unorm=-1.0)).optim_bits == 32
