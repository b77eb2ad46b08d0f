"""normkit.ops.numba._pages: large numba outputs in transparent huge pages, mid-size ones with their
missing pages made resident in one call (the prefault), and otherwise exactly torch.empty_like's
tensors.

Tests of layouts lower the threshold to 4 MiB (8 MiB tensors, cheap). Tests that check the advice
was taken use tensors above the real threshold (:data:`BIG`, 40 MiB): below 32 MiB glibc may hand
back recycled heap memory, which is rightly left alone. They are skipped where the OS does not
offer huge pages; the fallback tests simulate such systems. The prefault tests use 40 MiB blocks
with the huge page threshold out of reach (a fresh mapping, none of it resident) and glibc's heap
in a fresh process; they are skipped where the kernel predates ``MADV_POPULATE_WRITE``.
"""

from __future__ import annotations

import ctypes
import errno
import io
import mmap
import pickle
import subprocess
import sys

import pytest
import torch

import normkit.functional as NF
import normkit.functional_blocks as FB
from normkit.ops.numba import _pages

MiB = 1 << 20
OFFERED = _pages.huge_page_size() > 0
BIG = (2560, 4096)  # float32, 40 MiB: a fresh glibc mapping every time
needs_thp = pytest.mark.skipif(not OFFERED, reason="transparent huge pages not offered (not Linux or THP 'never')")


@pytest.fixture
def low_threshold(monkeypatch):
    monkeypatch.setattr(_pages, "MIN_BYTES", 4 * MiB)


@pytest.fixture
def fresh_libc():
    """Forget the cached probe before and after a test that fakes the system."""
    _pages._libc.cache_clear()
    yield
    _pages._libc.cache_clear()


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping holding ``addr`` (``hg``: advised huge pages)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def _interior(t: torch.Tensor) -> int:
    huge = _pages.huge_page_size()
    return -(-t.data_ptr() // huge) * huge


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def _map_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


PAGE = mmap.PAGESIZE


def _resident(lo: int, hi: int) -> bytes:
    """One byte per page of ``[lo, hi)`` (page-aligned): 1 where the page is resident."""
    libc = ctypes.CDLL(None)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    vec = ctypes.create_string_buffer((hi - lo) // PAGE)
    assert libc.mincore(lo, hi - lo, vec) == 0
    return bytes(b & 1 for b in vec.raw)


def _pages_of(t: torch.Tensor) -> tuple[int, int]:
    """The page-aligned interior of ``t``'s data."""
    return -(-t.data_ptr() // PAGE) * PAGE, (t.data_ptr() + t.nbytes) // PAGE * PAGE


def _populate_works() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    m = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    ok = libc.madvise(addr, PAGE, 23) == 0  # MADV_POPULATE_WRITE
    m.close()
    return ok and _pages._one_node()


needs_populate = pytest.mark.skipif(
    not _populate_works(), reason="no MADV_POPULATE_WRITE (Linux < 5.14) or several NUMA nodes"
)


@pytest.fixture
def no_huge(monkeypatch):
    """Huge pages out of reach: 40 MiB blocks stay fresh 4 KiB-page mappings for the prefault."""
    monkeypatch.setattr(_pages, "MIN_BYTES", 1 << 62)


# (label, make input): every layout empty_like distinguishes, each 8 MiB or more (advised with
# the lowered threshold) but for the small one.
CASES = [
    ("contiguous f32", lambda: torch.randn(2048, 1024)),
    ("40 MiB (a fresh mapping)", lambda: torch.empty(BIG)),
    ("U-Net GroupNorm channels_last 42 MB", lambda: torch.empty(8, 320, 64, 64).to(memory_format=torch.channels_last)),
    ("bf16", lambda: torch.randn(4096, 1024).to(torch.bfloat16)),
    ("f64", lambda: torch.randn(1024, 1031, dtype=torch.float64)),
    ("channels_last", lambda: torch.randn(2, 64, 128, 129).to(memory_format=torch.channels_last)),
    ("transposed (dense, permuted)", lambda: torch.randn(1031, 2048).t()),
    ("sliced (not dense)", lambda: torch.randn(2048, 2048)[:, ::2]),
    ("requires_grad leaf", lambda: torch.randn(2048, 1024, requires_grad=True)),
    ("non-leaf with history", lambda: torch.randn(2048, 1024, requires_grad=True) * 2),
    ("small (below threshold)", lambda: torch.randn(8, 4096)),
]


@pytest.mark.parametrize("make", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_like_torch_empty_like(make, low_threshold):
    x = make()
    want, got = torch.empty_like(x), _pages.empty_like(x)
    for attr in ("shape", "dtype", "device", "layout", "requires_grad", "is_leaf", "grad_fn"):
        assert getattr(got, attr) == getattr(want, attr), attr
    assert got.stride() == want.stride() and got.storage_offset() == want.storage_offset() == 0
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    assert got.untyped_storage().nbytes() == want.untyped_storage().nbytes()
    assert got.untyped_storage().resizable()
    assert type(got) is torch.Tensor
    if OFFERED and got.nbytes > 32 * MiB:
        assert "hg" in _vm_flags(_interior(got))


def test_empty_like_torch_empty(low_threshold):
    got, want = _pages.empty((4096, 1024), torch.float32), torch.empty((4096, 1024))
    assert (got.shape, got.stride(), got.dtype, got.requires_grad) == (want.shape, want.stride(), want.dtype, False)
    assert _pages.empty(7, torch.int64).shape == (7,)


@needs_thp
def test_large_outputs_are_advised():
    """At the real threshold a 64 MiB output's interior is advised (smaller ones: see below)."""
    big = _pages.empty_like(torch.empty(4096, 4096))
    assert "hg" in _vm_flags(_interior(big))


@needs_thp
def test_advise_only_what_the_tensor_owns(low_threshold):
    """The advised range lies inside the tensor's bytes, and memory already written is left alone."""
    t = _pages.empty(8 * MiB, torch.uint8)
    huge = _pages.huge_page_size()
    lo, hi = _interior(t), (t.data_ptr() + t.nbytes) // huge * huge
    assert t.data_ptr() <= lo < hi <= t.data_ptr() + t.nbytes
    t.fill_(1)
    assert not _pages.advise(t)  # resident already: nothing to save


@pytest.mark.parametrize("step, threshold", [("advise", "MIN_BYTES"), ("prefault", "PREFAULT_MIN_BYTES")])
def test_below_threshold_never_called(step, threshold, monkeypatch):
    def fail(t):
        raise AssertionError(f"{step} called below {threshold}")

    monkeypatch.setattr(_pages, step, fail)
    n = getattr(_pages, threshold)
    _pages.empty_like(torch.empty(8, 4096))
    _pages.empty((n - 1,), torch.uint8)
    _pages.empty_like(torch.empty(n // 8 - 1, dtype=torch.float64))


@needs_thp
def test_torch_semantics_of_advised_storage():
    t = _pages.empty_like(torch.empty(BIG))
    assert "hg" in _vm_flags(_interior(t))
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t))
    ref = t.clone()
    t.add_(1).mul_(2)  # in place
    assert torch.equal(t, (ref + 1) * 2)
    assert torch.equal(pickle.loads(pickle.dumps(t)), t)
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), t)
    u = _pages.empty_like(t)
    u.resize_(4096, 4096)  # the storage grows, as torch.empty's does
    assert u.shape == (4096, 4096)
    s = _pages.empty_like(t).fill_(3).share_memory_()
    assert s.is_shared() and bool((s == 3).all())


def _child_writes(t: torch.Tensor) -> None:
    t.fill_(7)


@needs_thp
def test_shared_with_another_process():
    ctx = torch.multiprocessing.get_context("fork")
    t = _pages.empty_like(torch.empty(BIG)).zero_().share_memory_()
    p = ctx.Process(target=_child_writes, args=(t,))
    p.start()
    p.join(60)
    assert p.exitcode == 0 and bool((t == 7).all())


class _Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        return _pages.empty((1024, 2048), torch.float32).fill_(i)


@needs_thp
def test_dataloader_workers(low_threshold):
    """A worker's advised tensors travel to the main process as torch.empty's do."""
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=None, num_workers=1, multiprocessing_context="fork")
    got = [b for b in loader]
    assert [float(b[0, 0]) for b in got] == [0.0, 1.0] and got[0].shape == (1024, 2048)


@needs_thp
def test_no_leak_over_100_allocations():
    """100 written 64 MiB outputs, each dropped: resident memory and the mapping count come back."""
    x = torch.empty(4096, 4096)
    y = _pages.empty_like(x).fill_(1)  # first one: the process's steady state
    del y
    rss, maps = _rss(), _map_count()
    for _ in range(100):
        y = _pages.empty_like(x)
        y.fill_(1)
        del y
    assert _rss() - rss < 32 * MiB
    assert _map_count() - maps <= 4


# ---- fallback where huge pages are not offered ----------------------------------------------


def _thp(tmp_path, enabled: str) -> str:
    d = tmp_path / "thp"
    d.mkdir()
    (d / "enabled").write_text(enabled + "\n")
    (d / "hpage_pmd_size").write_text(f"{2 * MiB}\n")
    return str(d)


@pytest.mark.parametrize("system", ["darwin", "win32", "never", "no sysfs", "unreadable mode"])
def test_fallback(system, tmp_path, monkeypatch, fresh_libc, low_threshold):
    if system in ("darwin", "win32"):
        monkeypatch.setattr(sys, "platform", system)
    else:
        monkeypatch.setattr(sys, "platform", "linux")
        text = {"never": "always madvise [never]", "unreadable mode": "garbage", "no sysfs": None}[system]
        monkeypatch.setattr(_pages, "SYSFS", str(tmp_path / "absent") if text is None else _thp(tmp_path, text))
    assert _pages.huge_page_size() == 0
    x = torch.randn(2048, 1024)
    t = _pages.empty_like(x)
    assert not _pages.advise(t)
    assert (t.shape, t.stride(), t.dtype) == (x.shape, x.stride(), x.dtype) and t.untyped_storage().resizable()


@pytest.mark.parametrize("mode", ["always", "madvise"])
def test_offered_modes(mode, tmp_path, monkeypatch, fresh_libc):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(
        _pages, "SYSFS", _thp(tmp_path, " ".join(f"[{m}]" if m == mode else m for m in ("always", "madvise", "never")))
    )
    assert _pages.huge_page_size() == 2 * MiB


def test_failed_madvise_is_ignored(monkeypatch, low_threshold):
    """A refused advice leaves an ordinary tensor (madvise returns -1)."""
    if not OFFERED:
        pytest.skip("huge pages not offered")
    _, mincore, sbrk, huge = _pages._libc()
    monkeypatch.setattr(_pages, "_libc", lambda: (lambda *a: -1, mincore, sbrk, huge))
    t = _pages.empty_like(torch.empty(2048, 1024))
    assert not _pages.advise(t) and t.fill_(2).sum() == 2 * t.numel()


def test_not_cpu_or_fake(low_threshold):
    m = _pages.empty_like(torch.empty(4096, 1024, device="meta"))
    assert m.is_meta and m.shape == (4096, 1024)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        f = _pages.empty_like(torch.empty(4096, 1024))
    assert f.shape == (4096, 1024)


# ---- the block norms' outputs -------------------------------------------------------------


@needs_thp
@pytest.mark.parametrize("op", ["dyt", "gated_rms_norm", "sandwich_rms_norm"])
def test_block_outputs_advised_and_exact(op, monkeypatch):
    """The numba block norms' outputs and input gradients are bit-identical with huge pages on and
    off, and match the float64 reference (on the first rows: each row's results are its own);
    the large ones are advised, x.grad included (autograd keeps the kernel's tensor)."""
    torch.manual_seed(0)
    M, D = BIG
    x, r, g, dy, dr = (torch.randn(M, D) for _ in range(5))
    w, alpha = torch.randn(D), torch.tensor(0.7)

    def run(dtype, backend, rows=M):
        xx, rr, gg, ww, aa = (t[:rows].to(dtype, copy=True).requires_grad_() for t in (x, r, g, w[None], alpha[None]))
        ww, aa = ww[0], aa[0]
        if op == "dyt":
            ys = (FB.dyt(xx, aa, ww, backend=backend),)
        elif op == "gated_rms_norm":
            ys = (FB.gated_rms_norm(xx, gg, ww, eps=1e-6, backend=backend),)
        else:
            ys = FB.sandwich_rms_norm(xx, rr, ww, ww, eps=1e-6, backend=backend)
        torch.autograd.backward(ys, [d[:rows].to(dtype) for d in (dy, dr)[: len(ys)]])
        return ys[0].detach(), xx.grad

    on = run(torch.float32, "numba")
    assert ["hg" in _vm_flags(_interior(t)) for t in on] == [True, True]  # y and x.grad
    monkeypatch.setattr(_pages, "MIN_BYTES", 1 << 62)  # off
    off = run(torch.float32, "numba")
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    ref = run(torch.float64, "reference", rows=64)
    for a, b in zip(on, ref):
        torch.testing.assert_close(a[:64], b.float(), rtol=1e-4, atol=1e-4)


@needs_thp
def test_heap_memory_left_alone():
    """With glibc told to serve large blocks from its heap, nothing is advised (in a fresh process:
    the setting is process-wide)."""
    assert _on_glibc_heap("print([_pages.advise(t) for t in ts])") == "[False, False, False]"


def _on_glibc_heap(code: str) -> str:
    """What ``code`` prints in a fresh process where glibc serves even 64 MiB from its heap and
    ``ts`` holds three fresh 64 MiB tensors (``grown``: /proc/self/maps once they exist)."""
    probe = (
        "import ctypes, torch\n"
        "from normkit.ops.numba import _pages\n"
        "ctypes.CDLL(None).mallopt(-3, 1 << 30)\n"  # M_MMAP_THRESHOLD
        "maps = lambda: open('/proc/self/maps').read()\n"
        "ts = [torch.empty(64 << 20, dtype=torch.uint8) for _ in range(3)]\n"
        "grown = maps()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe + code], capture_output=True, text=True, check=True
    ).stdout.strip()


# ---- the prefault ---------------------------------------------------------------------------


@needs_populate
def test_prefault_makes_the_interior_resident(no_huge):
    """A fresh block's interior becomes resident in one call; the partial pages at its ends, which
    it may share with other memory, are left to the kernel; the mapping is not changed (no advice,
    no split)."""
    t = torch.empty(BIG)  # 40 MiB: a mapping of its own, nothing resident
    lo, hi = _pages_of(t)
    assert not any(_resident(lo, hi))
    maps, flags = _map_count(), _vm_flags(lo)
    assert _pages.prefault(t)
    assert all(_resident(lo, hi))
    if (t.data_ptr() + t.nbytes) % PAGE:
        assert _resident(hi, hi + PAGE) == b"\x00"  # the tail page holds bytes past the tensor
    assert _map_count() == maps and _vm_flags(lo) == flags
    assert not _pages.prefault(t)  # nothing missing now
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t))
    assert t[-1, -1] == t.numel() - 1


@needs_populate
def test_prefault_only_the_missing_span(no_huge, monkeypatch):
    """A block whose head was written (a heap that grew under its tail) gets one call, from its
    first missing page to its last; a block with its last page resident gets none."""
    t = torch.empty(BIG)
    lo, hi = _pages_of(t)
    t.view(-1)[: t.numel() // 3].fill_(1)
    madvise, mincore, sbrk, huge = _pages._libc()
    calls = []

    def spy(addr, size, advice):
        calls.append((addr, size, advice))
        return madvise(addr, size, advice)

    monkeypatch.setattr(_pages, "_libc", lambda: (spy, mincore, sbrk, huge))
    assert _pages.prefault(t)
    ((addr, size, advice),) = calls
    written_end = (t.data_ptr() + t.nbytes // 3) // PAGE * PAGE
    assert advice == 23 and written_end <= addr <= written_end + PAGE and addr + size == hi
    calls.clear()
    u = torch.empty(BIG).fill_(2)
    assert not _pages.prefault(u) and calls == []


@needs_populate
def test_multi_node_machines_not_prefaulted(no_huge, monkeypatch):
    monkeypatch.setattr(_pages, "_one_node", lambda: False)
    t = _pages.empty_like(torch.empty(BIG))
    lo, hi = _pages_of(t)
    assert not _pages.prefault(t) and not any(_resident(lo, hi))


@pytest.mark.parametrize(
    "nodes, one", [(["node0", "cpu", "possible"], True), (["node0", "node1"], False), (None, True)]
)
def test_node_count(nodes, one, monkeypatch, tmp_path):
    d = tmp_path / "node"
    if nodes is not None:
        for n in nodes:
            (d / n).mkdir(parents=True)
    monkeypatch.setattr(_pages, "NODES", str(d))
    _pages._one_node.cache_clear()
    try:
        assert _pages._one_node() is one
    finally:
        _pages._one_node.cache_clear()


def test_prefault_refused_by_an_old_kernel(monkeypatch, no_huge):
    """EINVAL (Linux < 5.14) turns the prefault off for the process; the tensors stay valid."""
    if _pages._libc() is None or not _pages._one_node():
        pytest.skip("no madvise here, or several NUMA nodes")
    _, mincore, sbrk, huge = _pages._libc()
    calls = []

    def refuse(*args):
        calls.append(args)
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(_pages, "_prefault_refused", False)
    monkeypatch.setattr(_pages, "_libc", lambda: (refuse, mincore, sbrk, huge))
    t = _pages.empty_like(torch.empty(BIG))
    assert _pages._prefault_refused and len(calls) == 1
    assert not _pages.prefault(_pages.empty_like(torch.empty(BIG))) and len(calls) == 1
    assert t.fill_(2).sum() == 2 * t.numel()


@needs_thp
def test_huge_pages_not_prefaulted(monkeypatch):
    """An advised block faults in 2 MiB at a time: it is not prefaulted as well."""

    def fail(t):
        raise AssertionError("an advised block prefaulted")

    monkeypatch.setattr(_pages, "prefault", fail)
    assert "hg" in _vm_flags(_interior(_pages.empty_like(torch.empty(4096, 4096))))


@needs_populate
def test_prefault_on_heap_memory_leaves_no_trace():
    """glibc serving 64 MiB blocks from its heap (as it does 8-32 MiB ones): each fresh block is
    prefaulted, not advised, and the heap keeps its mappings and flags (in a fresh process: the
    setting is process-wide)."""
    out = _on_glibc_heap("print([_pages.advise(t) for t in ts], [_pages.prefault(t) for t in ts], maps() == grown)")
    assert out == "[False, False, False] [True, True, True] True"


@needs_populate
def test_layer_norm_on_regrown_heap(monkeypatch):
    """LayerNorm 4096x1024 (16 MiB outputs) on a heap trimmed before each call: the outputs are
    prefaulted, and forward and backward are bit-identical with the prefault off, and match float64
    torch on random weights, biases and upstream gradients."""
    g = torch.Generator().manual_seed(5)
    M, N = 4096, 1024
    x, dy = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g)
    w, b = torch.randn(N, generator=g), torch.randn(N, generator=g)
    trim = ctypes.CDLL(None).malloc_trim
    trim.argtypes = (ctypes.c_size_t,)
    real, done = _pages.prefault, []
    monkeypatch.setattr(_pages, "prefault", lambda t: done.append(real(t)) or done[-1])

    def run(dtype=torch.float32, backend="numba"):
        xx, ww, bb = (t.to(dtype).requires_grad_() for t in (x, w, b))
        trim(0)
        y = NF.layer_norm(xx, (N,), ww, bb, 1e-5, backend=backend)
        trim(0)
        grads = torch.autograd.grad(y, (xx, ww, bb), dy.to(dtype))
        return y.detach(), *grads

    on = run()
    assert any(done)
    monkeypatch.setattr(_pages, "PREFAULT_MIN_BYTES", 1 << 62)
    off = run()
    assert all(torch.equal(a, c) for a, c in zip(on, off))
    ref = run(torch.float64, "torch")
    for a, r, tol in zip(on, ref, (1e-5, 1e-4, 1e-3, 1e-3)):
        torch.testing.assert_close(a, r.float(), rtol=tol, atol=tol)
