"""The cuobjdump reader of `benchmarks/kernel_resources.py`, on (abridged) real cuobjdump output."""

from _scripts import load_script


def _kernel_resources():
    return load_script("benchmarks/kernel_resources.py")


def test_usage_records_of_an_object_file():
    """A fatbin section (arch header, several kernels, a Common block without REG)."""
    text = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _ZN6fgattn13co_bwd_kernelIN3c108BFloat16ELb1EEEvNS_8CoParamsIT_EE:
  REG:206 STACK:0 SHARED:37888 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN6fgattn13ca_fwd_kernelIfLb0EEEvNS_8CaParamsIT_EE:
  REG:236 STACK:0 SHARED:44544 LOCAL:16 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    records = _kernel_resources().usage_records(text)
    assert records == [
        {
            "arch": "sm_90",
            "function": "_ZN6fgattn13co_bwd_kernelIN3c108BFloat16ELb1EEEvNS_8CoParamsIT_EE",
            "regs": 206,
            "shared": 37888,
            "local": 0,
            "stack": 0,
        },
        {
            "arch": "sm_90",
            "function": "_ZN6fgattn13ca_fwd_kernelIfLb0EEEvNS_8CaParamsIT_EE",
            "regs": 236,
            "shared": 44544,
            "local": 16,
            "stack": 0,
        },
    ]


def test_usage_records_of_a_triton_cubin():
    """A bare cubin, as Triton writes one per kernel: no arch header."""
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _add_kernel:
  REG:10 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    (record,) = _kernel_resources().usage_records(text)
    assert record == {
        "arch": None,
        "function": "_add_kernel",
        "regs": 10,
        "shared": 0,
        "local": 0,
        "stack": 0,
    }


def test_kernel_filter_matches_qualified_names():
    """`--kernel` takes substrings of 'implementation._name'; no pattern takes every kernel."""
    kr = _kernel_resources()

    def kernel():
        pass

    kernel.__module__, kernel.__name__ = "fgattn.ops.triton.flash", "_contrastive_bwd_kernel"
    assert kr.qualified(kernel) == "triton_flash._contrastive_bwd_kernel"
    assert kr.selected(kernel, [])
    assert kr.selected(kernel, ["flash._contrastive_bwd", "nothing"])
    assert not kr.selected(kernel, ["triton_tiled.", "_fwd_kernel"])
    assert kr.parse_args(["--kernel", "a", "b"]).kernel == ["a", "b"]
