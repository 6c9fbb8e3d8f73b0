"""The dispatch point (fgattn.ops.dispatch, fgattn.backends): the rule table against the GPU
measurements it was written from; named backends, families and deprecated names; the global
setting; benchmark mode; torch.compile and export through `auto`; the package's import graph.
Every implementation's numbers against the fp64 reference: tests/test_conformance.py.
"""

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _numerics import close, leaf

import fgattn
from fgattn import backends
from fgattn.functional import channel_attention
from fgattn.ops import benchmark, dispatch, reference, registry, rules, sdpa
from fgattn.ops.call import Call

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "benchmarks" / "results" / "2026-11-23-h100" / "candidates_grid.json"
# What runs CPU tensors here: triton_*: the interpreter (triton_gram: L > 256 only)
CPU_IMPLS = ["reference", "sdpa_flash", "triton_tiled", "triton_flash"]


def make(op, b, c, length, dtype=torch.float32, scale=1.0):
    x = (torch.randn(b, c, length, dtype=torch.float64) * scale).relu().to(dtype)
    if op == "self":
        return [x]
    k = (torch.randn_like(x, dtype=torch.float64) * scale).to(dtype)
    if op == "cross":  # PCA-Net's shape: v = [F1 | F2]
        return [x, k, torch.cat([x, k], dim=2)]
    return [x, k.relu(), torch.tensor([0.7, -0.3])[:b].to(dtype)]


# ---------------------------------------------------------------------------------------------
# SDPA


def test_sdpa_folds_only_the_sign_into_q():
    # A rounded q·|scale| would move logits of 1e4 by ~1; the sign alone is exact in bf16.
    x = make("self", 1, 16, 49, torch.bfloat16, scale=30.0)[0]
    out = sdpa.self_attention(x, -1 / 3, "flash")
    ref = reference.self_attention(x.double(), -1 / 3)
    close(out, ref, 3e-2)


# ---------------------------------------------------------------------------------------------
# The rule table

DATA_NAMES = {
    "eager": "reference",
    "triton": "triton_tiled",  # named so when measured
    "cudnn_p8": "sdpa_cudnn",
    "flash_p8": "sdpa_flash",
    "efficient_p8": "sdpa_efficient",
}


def _measured_cells():
    cells = {}
    for row in json.loads(GRID.read_text())["rows"]:
        if row["impl"] in DATA_NAMES and "error" not in row:
            cells.setdefault((row["dtype"], row["C"], row["L"]), {})[DATA_NAMES[row["impl"]]] = row
    return cells


def cuda_call(op="self", dtype=torch.bfloat16, c=2048, length=196, grad=True, cap=(9, 0)):
    return Call(op, "cuda", "cuda:0", cap, dtype, 32, c, length, length, grad)


def cpu_call(op="self", dtype=torch.float32, c=512, length=49, grad=True, b=8):
    lv = 2 * length if op == "cross" else length  # PCA-Net's v = [F1 | F2]
    return Call(op, "cpu", "cpu", (0, 0), dtype, b, c, length, lv, grad)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(("cell", "rows"), sorted(_measured_cells().items()))
def test_rule_table_agrees_with_the_h100_grid(cell, rows, grad):
    # The rule's first measured preference is within 25 % of the fastest candidate, or within
    # 35 % while needing at most a quarter of its memory (the grid's noise is about ±30 % on
    # sub-millisecond cells).
    dtype, c, length = cell
    call = cuda_call(dtype=getattr(torch, dtype), c=c, length=length, grad=grad)
    rule = rules.rule_for(call)
    key = "fwd_bwd_ms" if grad else "fwd_ms"
    pick = next(name for name in rule.prefer if name in rows)
    best = min(rows, key=lambda name: rows[name][key])
    ratio = rows[pick][key] / rows[best][key]
    memory = rows[pick]["peak_mb"] / rows[best]["peak_mb"]
    assert ratio <= 1.25 or (ratio <= 1.35 and memory <= 0.25), (pick, best, ratio, memory)


@pytest.fixture
def roomy_gpu(monkeypatch):
    monkeypatch.setattr("fgattn.ops.call.free_bytes", lambda device: 80 << 30)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (cuda_call(), "sdpa_cudnn"),
        (cuda_call(c=512), "sdpa_flash"),
        (cuda_call(cap=(8, 0)), "sdpa_flash"),  # cuDNN is only measured on sm_90
        (cuda_call(dtype=torch.float16, length=784), "triton_tiled"),
        (cuda_call(length=784, grad=False), "sdpa_efficient"),
        (cuda_call(op="cross"), "sdpa_cudnn"),
        (cuda_call(dtype=torch.float32), "sdpa_efficient"),
        (cuda_call(dtype=torch.float32, c=512), "reference"),
        (cuda_call(dtype=torch.float32, length=49, c=1024), "sdpa_efficient"),
        (cuda_call(dtype=torch.float64), "reference"),
        (cuda_call(op="contrastive"), "triton_tiled"),
        (cuda_call(op="contrastive", length=784), "reference"),
        (cuda_call(op="contrastive", length=784, grad=False), "triton_tiled"),
        (cuda_call(op="contrastive", dtype=torch.float32), "reference"),
        (cpu_call(c=256, length=196), "reference"),
        (cpu_call(length=196), "sdpa_flash"),
        (cpu_call(dtype=torch.bfloat16, c=64, grad=False), "reference"),
        (cpu_call("cross", torch.bfloat16), "reference"),
        (cpu_call("cross", torch.bfloat16, c=1024), "sdpa_flash"),
        (cpu_call("cross", c=1024), "reference"),
        (cpu_call("cross", c=1024, grad=False), "sdpa_flash"),
        (cpu_call(c=2048, b=4), "sdpa_flash"),
        (cpu_call(dtype=torch.float64, c=2048, b=4), "reference"),
        (cpu_call("contrastive", c=64, b=2), "reference"),
        (cpu_call(c=64, b=0), "reference"),
    ],
    ids=str,
)
def test_rule_table_picks_what_it_says(roomy_gpu, call, expected):
    assert dispatch.by_rule(call).name == expected


def test_the_channel_matrix_is_built_only_where_it_fits(monkeypatch):
    call = cuda_call(dtype=torch.float32, c=2048, length=784)  # eager is fastest here
    monkeypatch.setattr("fgattn.ops.call.free_bytes", lambda device: 80 << 30)
    assert dispatch.by_rule(call).name == "reference"
    monkeypatch.setattr("fgattn.ops.call.free_bytes", lambda device: 1 << 30)  # needs 2 GiB
    assert dispatch.by_rule(call).name == "sdpa_efficient"
    assert "more than free" in registry.IMPLEMENTATIONS["reference"].why_not(call)


def test_unavailable_triton_is_skipped_and_named(monkeypatch, roomy_gpu):
    missing = "fgattn's Triton kernels could not be imported: No module named 'triton'"
    for name in ("triton_tiled", "triton_flash", "triton_gram"):
        impl = registry.Implementation(name, {}, lambda call: missing, registry.reference.LIMITS)
        monkeypatch.setitem(registry.IMPLEMENTATIONS, name, impl)
    assert dispatch.by_rule(cuda_call(length=784)).name == "reference"
    x = torch.randn(2, 8, 5)
    with pytest.raises(ValueError, match=r"backend .triton_tiled. cannot run .*No module named"):
        channel_attention(x, backend="triton_tiled")


def test_flash_kernels_are_never_offered_fp32_on_a_gpu(monkeypatch, roomy_gpu):
    # what the flash kernels' prune refuses at launch, the dispatcher never offers
    flash = pytest.importorskip("fgattn.ops.triton.flash")
    for module in (flash, flash.tuning):
        monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(flash.tuning, "shared_memory_limit", lambda device: 227 * 1024)  # H100
    impl = registry.IMPLEMENTATIONS["triton_flash"]
    for op in ("self", "cross", "contrastive"):
        reason = impl.why_not(cuda_call(op=op, dtype=torch.float32))
        assert reason is not None and "do not run fp32 inputs" in reason
        assert impl.supports(cuda_call(op=op, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Choosing: explicit self path, named backends, the global setting, benchmark mode


def test_self_attention_is_explicit(monkeypatch):
    calls = []
    impl = registry.IMPLEMENTATIONS["sdpa_flash"]
    functions = dict(impl.functions)
    for name, fn in impl.functions.items():
        functions[name] = lambda *a, _o=fn, _n=name: calls.append(_n) or _o(*a)
    monkeypatch.setitem(registry.IMPLEMENTATIONS, "sdpa_flash", impl.__class__(
        impl.name, functions, impl.refusal, impl.limits))  # fmt: skip
    x = torch.randn(2, 8, 5)
    channel_attention(x, backend="sdpa_flash")
    channel_attention(x, x, x, backend="sdpa_flash")
    channel_attention(x, v=x, backend="sdpa_flash")
    assert calls == ["self", "cross", "cross"]


def test_family_name_takes_its_best_member():
    assert backends.resolve("self", torch.randn(2, 8, 5), backend="sdpa") == "sdpa_flash"


def test_global_setting_and_context_manager():
    x = torch.randn(2, 512, 49)
    assert backends.resolve("self", x) == "sdpa_flash"  # auto
    backends.set_backend("reference")
    assert backends.resolve("self", x) == "reference"
    with backends.use_backend("sdpa"):
        assert backends.resolve("self", x) == "sdpa_flash"
        with pytest.raises(KeyError), backends.use_backend("triton_tiled"):
            raise KeyError  # restored on the way out
        assert backends.get_backend() == "sdpa"
    assert backends.get_backend() == "reference"
    assert backends.resolve("self", x, backend="auto") == "sdpa_flash"  # per call beats global


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: backends.set_backend("cuda"), ValueError, r"backend must be one of .*'cuda'"),
        (lambda: backends.set_backend(None), TypeError, "backend must be a str"),
        (lambda: setattr(backends, "benchmark", "yes"), TypeError, "must be a bool, got str"),
        (lambda: channel_attention(torch.randn(2, 4, 5), backend="fast"), ValueError, "fast"),
    ],
)
def test_bad_settings(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _python(code, **env):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300
    )


def test_environment_variable_never_breaks_cpu_tensors():
    # FGATTN_BACKEND=triton with no GPU and no interpreter: CPU tensors still run (auto), warned.
    code = (
        "import torch, warnings, fgattn\n"
        "from fgattn.ops import reference\n"
        "x = torch.randn(2, 8, 5)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = fgattn.functional.channel_attention(x)\n"
        "torch.testing.assert_close(y, reference.self_attention(x, -1.0))\n"
        "print(fgattn.backends.get_backend(), 'falling back' in str(w[0].message))\n"
    )
    proc = _python(code, FGATTN_BACKEND="triton_tiled")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["triton_tiled", "True"]


def test_bad_environment_variable_names_itself():
    # import fgattn never fails on it; the first op says what is wrong, naming the variable
    code = "import torch, fgattn; fgattn.functional.channel_attention(torch.randn(2, 4, 5))"
    proc = _python(code, FGATTN_BACKEND="bogus")
    assert proc.returncode != 0
    assert "$FGATTN_BACKEND must be one of" in proc.stderr and "'bogus'" in proc.stderr
    proc = _python("import fgattn; print(fgattn.backends.benchmark)", FGATTN_BENCHMARK="1")
    assert proc.stdout.strip() == "True", proc.stderr[-2000:]
    proc = _python("import fgattn; print(fgattn.backends.benchmark)", FGATTN_BENCHMARK="maybe")
    assert proc.returncode != 0 and "$FGATTN_BENCHMARK must be 1 or 0" in proc.stderr


@pytest.fixture
def fake_timer(monkeypatch):
    """time_call replaced by a table: reference is 'fastest', every call is logged."""
    log = []

    def fake(impl, call, repeat=5, scale=-1.0):
        log.append((impl.name, call.length))
        return {"reference": 1.0, "triton_tiled": 2.0}.get(impl.name, 3.0)

    monkeypatch.setattr(benchmark, "time_call", fake)
    return log


def test_benchmark_mode_times_once_per_shape(fake_timer):
    backends.benchmark = True
    x = torch.randn(2, 8, 5)
    for _ in range(3):
        channel_attention(x)
    assert sorted(fake_timer) == sorted((name, 5) for name in CPU_IMPLS)  # timed once
    x = torch.randn(2, 512, 5)  # the rule table would take sdpa_flash here
    channel_attention(x)
    assert backends.resolve("self", x) == "reference"  # the fastest by the (fake) clock
    assert len(fake_timer) == 2 * len(CPU_IMPLS)  # a new shape is timed again
    channel_attention(x.requires_grad_())  # so is the same shape with a gradient to come
    assert len(fake_timer) == 3 * len(CPU_IMPLS)
    backends.clear_benchmark_cache()
    channel_attention(torch.randn(2, 512, 5))
    assert len(fake_timer) == 4 * len(CPU_IMPLS)
    backends.benchmark = False
    assert backends.resolve("self", torch.randn(2, 512, 5)) == "sdpa_flash"


def test_benchmark_mode_rules_out_a_failing_candidate(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("this kernel does not compile")

    impl = registry.IMPLEMENTATIONS["reference"]
    functions = dict(impl.functions, self=broken)
    monkeypatch.setitem(registry.IMPLEMENTATIONS, "reference", impl.__class__(
        impl.name, functions, impl.refusal, impl.limits))  # fmt: skip
    backends.benchmark = True
    x = torch.randn(2, 8, 5)
    torch.testing.assert_close(channel_attention(x), sdpa.self_attention(x, -1.0, "flash"))
    assert list(benchmark._winners.values()) in (["sdpa_flash"], ["triton_tiled"], ["triton_flash"])


def test_fallback_warning_points_at_the_callers_line():
    backends.set_backend("triton_tiled")
    sci = fgattn.SCI(8)
    with pytest.warns(UserWarning, match="falling back") as record:
        sci.double()(torch.randn(2, 8, 3, 3, dtype=torch.float64))
    assert record[0].filename == __file__


def test_benchmark_mode_really_times():
    backends.benchmark = True
    x = torch.randn(2, 16, 9)
    torch.testing.assert_close(channel_attention(x), reference.self_attention(x, -1.0))
    (winner,) = benchmark._winners.values()
    assert winner in CPU_IMPLS


# ---------------------------------------------------------------------------------------------
# torch.compile through auto


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_through_auto(dynamic):
    sci, co = fgattn.SCI(16), fgattn.CoAttention()

    def step(x, f):
        return sci(x).square().sum() + co(f).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for size in (5, 6):  # a second size: recompiles (static) or reuses (dynamic)
        x, f = leaf(torch.randn(2, 16, size, size)), leaf(torch.randn(4, 16, size, 3))
        got = torch.autograd.grad(compiled(x, f), (x, f))
        want = torch.autograd.grad(step(x, f), (x, f))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_in_benchmark_mode_uses_cached_winners_and_never_times(fake_timer, monkeypatch):
    backends.benchmark = True
    x = torch.randn(2, 8, 5)
    channel_attention(x)  # eager: timed, reference wins
    assert len(fake_timer) == len(CPU_IMPLS)
    fn = torch.compile(lambda t: channel_attention(t), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(x), channel_attention(x, backend="reference"))
    y = torch.randn(2, 8, 6)  # not cached: the rule table decides, nothing is timed in a trace
    torch.testing.assert_close(fn(y), reference.self_attention(y, -1.0))
    assert len(fake_timer) == len(CPU_IMPLS)


def test_torch_compile_is_not_export():
    # Dynamo of torch 2.8/2.9 traces torch.compiler.is_exporting() as True under torch.compile
    # (pytorch/pytorch#176347): the export fallback then swapped every compiled model's Triton
    # kernels for the reference. Under compile `exporting()` must be False, under export True.
    def f(x):
        return x + 1 if dispatch.exporting() else x - 1

    x = torch.zeros(3)
    assert torch.compile(f, fullgraph=True)(x).tolist() == [-1.0] * 3
    assert torch.export.export(_Call(f), (x,)).module()(x).tolist() == [1.0] * 3


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# ---------------------------------------------------------------------------------------------
# Names of fgattn 0.1, and resolve's arguments


@pytest.mark.parametrize(
    ("old", "new"), [("triton", "triton_tiled"), ("triton_fa", "triton_flash")]
)
def test_deprecated_names_warn_once_and_work(old, new, monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    x = torch.randn(2, 8, 5)
    with pytest.warns(FutureWarning, match=rf"{old!r} is now called {new!r}"):
        backends.set_backend(old)
    assert backends.get_backend() == new
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # once per name: no second warning
        assert backends.resolve("self", x, backend=old) == new
        torch.testing.assert_close(
            channel_attention(x, backend=old), reference.self_attention(x, -1.0)
        )


def test_deprecated_name_in_the_environment():
    code = "import fgattn; print(fgattn.backends.get_backend())"
    proc = _python(code, FGATTN_BACKEND="triton_fa")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "triton_flash"
    assert "FutureWarning" in proc.stderr and "'triton_fa' is now called" in proc.stderr


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("selfie", torch.randn(2, 4, 5)), ValueError, r"op must be one of .*'selfie'"),
        (("self",), ValueError, r"takes x: got 0 tensors"),
        (("cross", torch.randn(2, 4, 5)), ValueError, r"takes q, k, v: got 1"),
        (("self", "x"), TypeError, r"tensor 0 must be a torch.Tensor"),
        (("self", torch.randn(2, 4, 5, 6)), ValueError, r"must be \(B, C, L\)"),
        ((3, torch.randn(2, 4, 5)), TypeError, r"op must be a str"),
    ],
)
def test_resolve_says_what_is_wrong(args, error, match):
    with pytest.raises(error, match=match):
        backends.resolve(*args)


# ---------------------------------------------------------------------------------------------
# The import graph


def _imports(path: Path, module: str) -> set[str]:
    """The fgattn modules `module` (file `path`) imports, at its top level or inside functions."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fgattn")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.startswith("fgattn"):
                found |= {f"{base}.{a.name}" for a in node.names} | {base}
    return found


def test_the_package_imports_without_a_circle():
    root = ROOT / "fgattn"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {m: {i for i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages are built, not a circle
    graph = {m: {i for i in deps if not i.startswith(m + ".")} for m, deps in graph.items()}
    state, cycle = {}, []

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycle.extend([*path, m, dep])
                return True
            if dep not in state and visit(dep, [*path, m]):
                return True
        state[m] = "done"
        return False

    assert not any(visit(m, []) for m in sorted(graph) if m not in state), " -> ".join(cycle)
    assert "fgattn.backends" not in set().union(*(graph[m] for m in graph if ".ops" in m))
