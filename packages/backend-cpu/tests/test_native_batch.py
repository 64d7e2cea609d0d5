"""Batched decode on the native decoder (``NativeDecoder.forward_rows``, ``lowbit.run.engine.generate_batch``):
several sequences, each in its own slot of the KV cache, one token of each per call.

Reference: the same prompts run one at a time through ``generate`` / ``forward`` (batch 1, slot 0). Tolerances:
fp32 activations and int8 activations on the row kernels compute every row exactly as a batch-1 call does, so
logits are equal to 1e-6 relative (measured: 0 in fp32, ~3e-7 in int8 mode); at 12 or more rows the int8 matrices
run on the AMX tiles, which take the same int32 sums in another fp32 order (1e-5). Greedy tokens are identical
for 40 steps in every family (prompts of different lengths, so every slot is at its own position).
"""

import pytest
import torch
from test_native_decoder import FAMILIES, make_qmodel, prompt, rel

from lowbit.errors import LowbitError
from lowbit.run import engine as runtime
from lowbit_cpu import engine, native

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))

LENGTHS = (5, 9, 17, 3, 30, 12)


@pytest.fixture(scope="module", params=FAMILIES)
def qm(request):
    return make_qmodel(request.param)


def prompts(lengths=LENGTHS):
    return [prompt(n, seed=n)[0].tolist() for n in lengths]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "int8-act"])
def test_greedy_batch_equals_one_at_a_time(qm, dtype):
    nat = runtime.runner_for(qm, dtype, capacity=96)
    ps = prompts()
    want = [runtime.generate(nat, torch.tensor([p]), 40)[0].tolist() for p in ps]
    got = runtime.generate_batch(nat, ps, 40)
    assert got == want


@pytest.mark.parametrize("dtype,rows,tol", [(torch.float32, 6, 1e-6), (torch.bfloat16, 6, 1e-6),
                                            (torch.bfloat16, 13, 1e-5)], ids=["fp32", "int8-rows", "int8-13rows"])
def test_rows_logits_equal_batch_one(qm, dtype, rows, tol):
    dec = engine.NativeDecoder(qm, dtype, capacity=64)
    ps = prompts((LENGTHS * 3)[:rows])
    toks = list(range(1, rows + 1))
    one = []
    for p, t in zip(ps, toks):
        dec.reset(slots=1)
        dec.forward(p)
        one.append(dec.forward([t]))
    dec.reset(slots=rows)
    for i, p in enumerate(ps):
        dec.forward(p, slot=i)
    order = list(reversed(range(rows)))  # rows need not be in slot order
    got = dec.forward_rows([toks[i] for i in order], order)
    assert rel(got, torch.stack(one)[order]) < tol
    assert dec.past == [len(p) + 1 for p in ps]


def test_threads_1_and_2_agree():
    dec = engine.NativeDecoder(make_qmodel("llama"), torch.bfloat16, capacity=64)
    out = []
    for threads in (1, 2):
        dec.reset(slots=4)
        for i, p in enumerate(prompts(LENGTHS[:4])):
            dec.forward(p, slot=i, threads=threads)
        out.append(dec.forward_rows([3, 4, 5, 6], [0, 1, 2, 3], threads=threads))
    assert torch.equal(out[0], out[1])


def test_a_finished_sequence_leaves_the_others_running():
    nat = runtime.runner_for(make_qmodel("llama"), torch.float32, capacity=96)
    ps = prompts()
    free = [runtime.generate(nat, torch.tensor([p]), 24)[0].tolist() for p in ps]
    stop = free[2][len(ps[2]) + 5]  # the sixth new token of the third prompt ends it (and any other that picks it)
    want = [runtime.generate(nat, torch.tensor([p]), 24, eos=[stop])[0].tolist() for p in ps]
    got = runtime.generate_batch(nat, ps, 24, eos=[stop])
    assert got == want
    k = free[2][len(ps[2]):].index(stop)  # the stop token's first place among the third prompt's new tokens
    assert len(got[2]) == len(ps[2]) + k + 1 and got[2][-1] == stop
    assert any(len(g) - len(p) > k + 1 for g, p in zip(got, ps))  # others ran on after it stopped


def test_bad_rows_are_one_line_errors():
    dec = engine.NativeDecoder(make_qmodel("llama"), torch.float32, capacity=8)
    dec.reset(slots=2)
    dec.forward([1, 2, 3], slot=0)
    for args, msg in [(([1, 2], [0, 0]), "distinct sequence slots"), (([1], [2]), "not all among the 2 allocated"),
                      (([1, 2], [0]), "2 tokens need 2 distinct"), (([400], [0]), "token id out of range")]:
        err = pytest.raises(LowbitError, dec.forward_rows, *args).value
        assert msg in str(err) and "\n" not in str(err)
    with pytest.raises(LowbitError, match="sequence slot 2 is not one of the 2 allocated"):
        dec.forward([1], slot=2)
    dec.forward([1, 2, 3, 4, 5], slot=0)
    with pytest.raises(LowbitError, match=r"^9 positions do not fit the KV cache of 8"):
        dec.forward_rows([1, 2], [0, 1])
    assert dec.past == [8, 0]  # a refused call changes nothing
    with pytest.raises(LowbitError, match="at least one prompt"):
        runtime.generate_batch(runtime.runner_for(make_qmodel("llama"), torch.float32), [[1], []], 4)


def test_avx2_build_batches_too(monkeypatch):
    """The AVX2-only build (no AVX-512 anywhere) runs the same rows: greedy batch equals one at a time."""
    from lowbit import cpuinfo as core_cpuinfo

    flags = frozenset({"avx2", "fma", "f16c"})
    monkeypatch.setattr(core_cpuinfo, "cpu_flags", lambda: flags)
    monkeypatch.setattr(native.cpuinfo, "cpu_flags", lambda: flags)
    nat = runtime.runner_for(make_qmodel("qwen3"), torch.bfloat16, capacity=64)
    assert not nat.decoder.vnni
    ps = prompts(LENGTHS[:4])
    want = [runtime.generate(nat, torch.tensor([p]), 16)[0].tolist() for p in ps]
    assert runtime.generate_batch(nat, ps, 16) == want
