"""The ``normkit`` command line, end to end on the CPU with small settings: every subcommand
runs, and what it prints and writes (numbers, JSON, PNG, exit codes) is checked."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normkit
from cases import REFERENCE
from normkit.norms import NORMS, Sizes
from normkit.tools import cli
from normkit.tools.check import CASES, CheckResult, run_check
from normkit.tools.compare import _adamw_step, verdict
from normkit.tools.explain import Explanation, explain, find_norms
from normkit.tools.tutorials import replay_tutorials

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def run_main(*argv: str) -> int:
    return cli.main(list(argv))


# --- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    [],
    ["explain", "no_such_norm"],
    ["explain", "--shape", "2,3"],
    ["explain", "gn", "--shape", "2,6,3,3", "--groups", "4"],  # parses, but 4 does not divide C = 6
    ["bench", "--shapes", "128"],
    ["bench", "--op", "instance_norm"],
    ["bench", "--provider", "nope"],
    ["bench", "--dtype", "int8"],
    ["compare", "--norm", "WeightNorm"],
    ["compare", "--batch-sizes", "0,4"],
])
def test_bad_arguments_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


USER_MISTAKES = [
    (["check", "--op", "nonexistent"], "no check case matches --op 'nonexistent'"),
    (["check", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["check", "--backend", "nope"], "unknown --backend 'nope'"),
    (["check", "--backend", "triton"], "--backend triton: its kernels run on CUDA GPUs"),
    (["bench", "--provider", "nope"], "unknown --provider nope"),
    (["compare", "--data", "/missing.npz"], "--data /missing.npz: no such file"),
    (["explain", "--groups", "4", "--shape", "2,6,3,3"], "--groups 4 must divide the channels C = 6"),
]


@pytest.mark.parametrize("argv, message", USER_MISTAKES)
def test_user_mistakes_are_one_line_and_exit_2(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # Triton then needs a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    # the subcommand's usage, then one line: what was wrong
    assert err.startswith(f"usage: normkit {argv[0]} ")
    assert err.splitlines()[-1].startswith(f"normkit {argv[0]}: error: ") and message in err.splitlines()[-1]


def test_bad_data_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("not an archive")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--data", str(not_npz), "--quick"])
    assert exc.value.code == 2 and f"--data {not_npz}: " in capsys.readouterr().err


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from normkit.tools._terminal import UsageError

    with pytest.raises(UsageError, match="no check case matches"):
        cli.main(["--debug", "check", "--op", "nonexistent"])
    with pytest.raises(UsageError, match="no check case matches"):
        cli.main(["check", "--op", "nonexistent", "--debug"])

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the kernel cache is corrupt")

    monkeypatch.setattr("normkit.tools.check.run_check", broken)
    assert cli.main(["check", "--op", "GroupNorm"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("normkit check: error: RuntimeError: the kernel cache is corrupt "
                           "(run with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="corrupt"):
        cli.main(["check", "--op", "GroupNorm", "--debug"])


@pytest.mark.parametrize("argv", [["explain", "--png", "out.png"], ["bench", "--png", "out.png"],
                                  ["compare", "--quick"]])
def test_missing_extra_is_named_before_any_work(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "sklearn") else find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == ""  # nothing computed or printed first
    assert 'which is not installed: pip install "normkit[cli]"' in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"normkit {normkit.__version__} (torch {torch.__version__}")


def test_python_dash_m_normkit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import runpy

    monkeypatch.setattr(sys, "argv", ["normkit", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("normkit", run_name="__main__")
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("normkit ")


def test_version_has_one_source() -> None:
    from importlib.metadata import version

    assert version("normkit") == normkit.__version__


def test_check_passes_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    assert run_main("check", "--op", "GroupNorm", "--backend", "reference", "--dtype", "float32",
                    "--json", str(out)) == 0
    payload = json.loads(out.read_text())
    assert payload["torch"] == torch.__version__
    [row] = [r for r in payload["results"] if r["case"] == "GroupNorm"]
    assert (row["case"], row["backend"], row["dtype"], row["ok"]) == ("GroupNorm", "reference", "float32", True)
    assert row["max_error"] <= row["tolerance"]


def test_check_lists_and_counts_skips(capsys: pytest.CaptureFixture[str]) -> None:
    # ATen has no CPU bf16 avg_pool3d: the torch backend declines 4-D LocalResponseNorm in bf16
    assert run_main("check", "--op", "LocalResponseNorm", "--backend", "torch", "--dtype", "bfloat16") == 0
    out = " ".join(capsys.readouterr().out.split())  # wrapped to the terminal
    assert "0 passed, 0 failed, 1 skipped" in out
    assert ("skipped 1: normkit backend 'torch' cannot run this local_response_norm call: ATen has no CPU "
            "torch.bfloat16 avg_pool3d, which its local_response_norm uses for 4-D+ input: LocalResponseNorm torch "
            "bfloat16") in out


def test_check_covers_every_module() -> None:
    classes = {n for n in normkit.modules.__all__ if isinstance(getattr(normkit.modules, n), type)}
    checked = {type(case.normkit_module("reference")).__name__ for case in CASES}
    checked |= {c.removeprefix("Lazy") for c in classes if c.startswith("Lazy")}  # become their non-lazy class
    assert classes <= checked, f"modules normkit check does not run: {sorted(classes - checked)}"
    assert {c.extra for c in CASES} >= {"mask", "residual"}


def test_check_without_a_twin_uses_the_float64_reference_and_can_fail() -> None:
    [ghost] = [c for c in CASES if c.name == "GhostBatchNorm2d"]
    assert ghost.torch_module is None and ghost.oracle == "reference f64"
    [ok] = run_check([ghost], ["torch"], [torch.float32])
    assert ok.ok and ok.skipped is None and ok.max_error <= ok.tolerance
    # a backend that got the virtual batches wrong (3 samples where the reference takes 2): caught
    wrong = dataclasses.replace(
        ghost, normkit_module=lambda b: normkit.GhostBatchNorm2d(3, 2 if b == "reference" else 3, backend=b))
    [bad] = run_check([wrong], ["torch"], [torch.float32])
    assert not bad.ok and bad.max_error > bad.tolerance


def test_check_compile_compares_compiled_with_eager() -> None:
    [case] = [c for c in CASES if c.name == "LayerNorm2d"]
    results = run_check([case], ["torch"], [torch.float32], compile=True, compile_backend="aot_eager")
    assert [r.case for r in results] == ["LayerNorm2d", "LayerNorm2d [compiled]"]
    assert all(r.ok and r.skipped is None for r in results)
    assert results[1].oracle == "eager" and results[1].max_error <= results[1].tolerance


def test_check_failure_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    failing = CheckResult("LayerNorm", "reference", "float32", 1.0, 1e-5, "output", False)
    monkeypatch.setattr("normkit.tools.check.run_check", lambda *args, **kwargs: [failing])
    assert run_main("check", "--op", "LayerNorm", "--dtype", "float32") == 1
    assert "FAIL" in capsys.readouterr().out


# --- explain -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query, name", [
    ("batch_norm", "batch_norm"), ("BatchNorm", "batch_norm"), ("bn", "batch_norm"), ("BatchNorm2d", "batch_norm"),
    ("ln", "layer_norm"), ("LayerNorm", "layer_norm"), ("gn", "group_norm"), ("group", "group_norm"),
    ("in", "instance_norm"), ("InstanceNorm3d", "instance_norm"), ("rms", "rms_norm"), ("RMSNorm", "rms_norm"),
])
def test_norm_names(query: str, name: str) -> None:
    assert find_norms(query) == [name]


@pytest.mark.parametrize("name", list(NORMS))
def test_every_row_is_found_by_its_names(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = NORMS[name]
    assert find_norms(name) == [name] and find_norms(spec.module) == [name]
    # normkit check --op <row name> runs the row's own case (its example's module), whatever else matches
    chosen: list[object] = []
    monkeypatch.setattr("normkit.tools.check.run_check", lambda cases, *a, **k: chosen.extend(cases) or [])
    assert run_main("check", "--op", name) == 0
    module = spec.example().module
    assert any(c.op == name and type(c.normkit_module("reference")).__name__ == module for c in chosen)


# What a norm's output, without its affine, has over each reduced set, per kind of statistic
# (NormSpec.statistic): (|mean| or 0 when not centred, the deviation of the statistic from 1).
NORMALIZED = {
    "variance": lambda v: (v.mean().item(), v.var(unbiased=False).item() - 1),
    "mean_square": lambda v: (0.0, v.square().mean().item() - 1),
    "l2_norm": lambda v: (0.0, v.norm().item() - 1),
}


def expected_counts(name: str, shape: tuple[int, ...], groups: int, normalized_ndim: int) -> tuple[int, int]:
    """(statistics, elements per statistic) from the row's reduce rule: the product of the kept
    axes' sizes (N, C, or GroupNorm's G), or of the leading axes for a trailing norm (times the
    groups of the last dim where it has them); none for a norm without statistics."""
    spec = NORMS[name]
    rule = spec.reduce
    if spec.statistic == "none":
        return 0, 0
    if rule.trailing:
        count = math.prod(shape[:len(shape) - (rule.trailing_ndim or normalized_ndim)]) * (groups if rule.groups else 1)
    else:
        count = math.prod({"N": shape[0], "C": shape[1], "G": groups}[axis] for axis in rule.kept)
    return count, math.prod(shape) // count


def assert_normalizes_the_named_sets(e: Explanation, y: torch.Tensor) -> None:
    """``y``, the oracle's output without affine, is normalized over exactly the sets
    ``e.statistic_of`` names, each of ``e.elements_per_statistic`` elements."""
    for k in range(e.num_statistics):
        values = y[e.statistic_of == k]
        assert values.numel() == e.elements_per_statistic
        mean, deviation = NORMALIZED[NORMS[e.name].statistic](values)
        assert abs(mean) < 1e-6 and abs(deviation) < 1e-3, (k, mean, deviation)


@pytest.mark.parametrize("name", list(NORMS))
def test_explain_counts_and_sets_match_torch(name: str) -> None:
    """Every row of the table, explained on (N, C, H, W) = (2, 6, 4, 6) with G = 2 (of C, or of
    the last dim for a norm grouping it), against the row's oracle (torch's twin, else normkit's
    reference) run in float64 through its own example, its per-call tensors at their neutral values."""
    shape, groups, k = (2, 6, 4, 6), 2, 3  # explain's default: the trailing norms over all but N
    spec = NORMS[name]
    e = explain(name, shape, groups=groups)
    assert (e.num_statistics, e.elements_per_statistic) == expected_counts(name, shape, groups, k)
    ex = spec.example(Sizes(shape, normalized_ndim=k, num_groups=groups))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 2
    extras = [torch.full(s, extra.neutral, dtype=torch.float64) for s, extra in zip(ex.input_shapes, spec.inputs)]
    assert set(e.inputs) == {extra.name for extra in spec.inputs}
    if spec.statistic == "none":  # nothing reduced: no sets, and explain says so
        assert e.reduced_axes == () and (e.statistic_of == -1).all() and "no statistics" in e.output_property
    else:
        y = ex.call(F if spec.twin is not None else REFERENCE, x, *extras, *(None for _ in spec.params))
        assert_normalizes_the_named_sets(e, y)
        # one element moved into the next set: the sets no longer match what the oracle normalizes
        moved = dataclasses.replace(e, statistic_of=e.statistic_of.flatten().roll(1).reshape(shape))
        with pytest.raises(AssertionError):
            assert_normalizes_the_named_sets(moved, y)
    assert e.max_diff_vs_torch < 1e-5
    # parameters and buffers: the oracle's module in its default configuration (positional arguments only)
    module = getattr(nn if spec.twin is not None else normkit, ex.module)(*ex.module_args)
    assert e.parameters == {n: tuple(p.shape) for n, p in module.named_parameters()}
    assert e.buffers == {n: tuple(b.shape) for n, b in module.named_buffers()}
    assert e.running_stats == (getattr(module, "running_var", None) is not None)
    assert (e.train_eval_max_diff > 0) == e.running_stats


def test_explain_says_what_the_per_call_tensors_do_and_that_dyt_has_no_statistics(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The adaLN norm names the axis it reduces and what shift and scale do; DyT: no statistics."""
    assert run_main("explain", "modulated_layer_norm", "--shape", "2,3,4,8") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "reduced over W; kept apart: N, C, H" in text
    assert "shift: added after the norm" in text and "scale: multiplies the normalized x by (1 + scale)" in text
    for name in ("dyt", "derf"):
        assert run_main("explain", name, "--shape", "2,3,4,8") == 0
        assert "no statistics" in " ".join(capsys.readouterr().out.split())


def test_explain_cli_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "explain.json", tmp_path / "explain.png"
    assert run_main("explain", "--shape", "2,3,4,5", "--json", str(out), "--png", str(png)) == 0
    text = capsys.readouterr().out
    assert "3 means and 3 variances, each over 40 elements" in text  # BatchNorm on (2, 3, 4, 5)
    norms = {n["name"]: n for n in json.loads(out.read_text())["norms"]}
    assert list(norms) == list(NORMS)
    bn = norms["batch_norm"]
    assert bn["reduced_axes"] == ["N", "H", "W"] and bn["kept_axes"] == ["C"]
    assert bn["parameters"] == {"weight": [3], "bias": [3]}
    assert norms["rms_norm"]["statistics"] == ["mean square"]
    assert_png(png)


def test_explain_seed_replays_agree_with_torch_and_the_seeds(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seed.json"
    assert run_main("explain", "--seed", "--json", str(out)) == 0
    text = capsys.readouterr().out
    for printed in ("-1.3574", "-1.2340", "1.8511", "-1.3416", "-0.4472", "0.1401", "1.6730"):
        assert printed in text
    replays = json.loads(out.read_text())["replays"]
    checks = [c for r in replays for c in r["checks"]]
    assert all(c["ok"] for c in checks)
    against = {c["against"] for c in checks}
    assert {"torch.nn.BatchNorm2d", "torch.nn.LayerNorm", "by hand"} <= against
    # all five tutorials, named by what they show, never by their file names
    assert {r["source"].split(":")[0] for r in replays} == {f"tutorial 00{i}" for i in range(5)}
    assert ".txt" not in text and all(".txt" not in r["source"] + r["title"] for r in replays)
    titles = " | ".join(r["title"] for r in replays)
    for shown in ("BatchNorm2d by hand, 2x2x3x3", "from scratch, checked with allclose", "LazyBatchNorm2d infers C",
                  "LayerNorm([3, 5, 5]) over a whole 1x3x5x5 image", "LayerNorm2d"):
        assert shown in titles
    # tutorial 001: the four from-scratch models are allclose to normkit, as the tutorial prints True
    scratch = [c for c in checks if c["against"] == "the tutorial's from-scratch model"]
    assert len(scratch) == 4 and all(c["passed"] for c in scratch)
    # tutorial 002: C inferred on the first call; torch's error, word for word, when C changes
    assert "normkit: RuntimeError: running_mean should contain 4 elements not 3" in text
    # tutorial 004: its printed per-pixel values, and its eps 1e-6 named
    assert "-1.0690, -0.2673, 1.3363" in text and "eps is 1e-6, LayerNorm's default 1e-5" in " ".join(text.split())


def test_explain_is_english_by_default_and_wraps(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert run_main("explain", "--shape", "2,6,3,3") == 0
    text = capsys.readouterr().out
    assert not any("\u4e00" <= ch <= "\u9fff" for ch in text)  # no Chinese
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "InstanceNorm2d(6)" in text  # torch's default configuration: no affine, no running stats
    assert run_main("explain", "ln", "--lang", "zh") == 0
    text = capsys.readouterr().out
    assert "计算维度" in text and "固定维度" in text


def test_seed_replay_numbers_against_torch_directly() -> None:
    bn = replay_tutorials()[0]
    x = torch.tensor([[[[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[11, 12, 13], [14, 15, 16], [17, 18, 19]]],
                      [[[11, 13, 15], [17, 19, 21], [23, 25, 27]], [[21, 23, 25], [27, 29, 31], [33, 35, 37]]]],
                     dtype=torch.float32)
    m = nn.BatchNorm2d(2)
    y = m(x).detach()
    found = {(c.what, c.against): c for c in bn.checks}
    assert found[("mean", "torch (ATen batch_norm's saved mean)")].normkit == pytest.approx([12.0, 22.0])
    assert torch.allclose(torch.tensor(found[("y", "torch.nn.BatchNorm2d")].normkit), y, atol=1e-6)
    assert found[("running_var", "torch.nn.BatchNorm2d")].normkit == pytest.approx(m.running_var.tolist())


# --- bench -------------------------------------------------------------------------------------


def test_bench_json_png_and_bytes_model(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert run_main("bench", "--op", "layer_norm", "--shapes", "64x128,16x512", "--budget", "0.01", "--no-compile",
                    "--direction", "infer", "--direction", "fwd", "--direction", "bwd", "--json", str(out),
                    "--png", str(png)) == 0
    payload = json.loads(out.read_text())
    copy_gbps = payload["meta"]["copy_GBps"]
    assert copy_gbps > 0
    rows = payload["rows"]
    from normkit.tools import bench

    assert {r["provider"] for r in rows} == set(bench.providers("cpu")) - {"torch.compile"}
    for r in rows:
        assert "error" not in r and r["max_err_vs_torch"] < 1e-4
        m, n = map(int, r["shape"].split("x"))
        # read x, write y, read weight and bias, write fp32 mean and rstd per row
        fwd_bytes = 2 * m * n * 4 + 2 * n * 4 + m * 8
        # read x and dy, write dx, read weight, write dweight and dbias, read the statistics
        bwd_bytes = 3 * m * n * 4 + 3 * n * 4 + m * 8
        # the inference forward (no autograd) is held to the forward's traffic
        for direction, nbytes in (("infer", fwd_bytes), ("fwd", fwd_bytes), ("bwd", bwd_bytes)):
            assert r[f"{direction}_ms"] > 0
            assert r[f"{direction}_GBps"] == pytest.approx(nbytes / (r[f"{direction}_ms"] * 1e-3) / 1e9)
            assert r[f"{direction}_of_copy"] == pytest.approx(r[f"{direction}_GBps"] / copy_gbps)
            assert f"{direction}_speedup_vs_compile" not in r
            assert r[f"{direction}_ms_min"] <= r[f"{direction}_ms"] <= r[f"{direction}_ms_max"]
        assert "fwd+bwd_ms" not in r
    assert all(r["fwd_speedup_vs_torch"] == pytest.approx(1.0) for r in rows if r["provider"] == "torch")
    assert_png(png)


def test_bench_infer_times_the_forward_without_autograd() -> None:
    """``infer`` calls the op under ``torch.no_grad()`` (an inference call, nothing saved), ``fwd``
    with autograd recording."""
    from normkit.tools import bench

    seen: dict[str, list[bool]] = {"grad": [], "graph": []}

    def fn(t: dict[str, torch.Tensor]) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(t["x"], t["x"].shape[-1:], t["weight"], t["bias"])
        seen["grad"].append(torch.is_grad_enabled())
        seen["graph"].append(y.grad_fn is not None)
        return y

    (p,) = bench.problems(["layer_norm"], {"rows": [(4, 8)]}, [torch.float32])
    reference = (fn(p.make("cpu")),)
    for direction, grad in (("infer", False), ("fwd", True)):
        seen["grad"].clear(), seen["graph"].clear()
        _, timers = bench._prepare(p, fn, "cpu", [direction], reference, 1e-4)
        seen["grad"].clear(), seen["graph"].clear()
        timers[direction].sample_ms()
        assert seen["grad"] and set(seen["grad"]) == {grad} and set(seen["graph"]) == {grad}, direction


def test_bench_calls_a_speedup_only_outside_the_spread() -> None:
    from normkit.tools.bench import add_speedups

    def row(provider: str, median: float, lo: float, hi: float) -> dict[str, object]:
        return {"op": "rms_norm", "shape": "64x64", "groups": 0, "dtype": "float32", "threads": 1,
                "provider": provider, "fwd_ms": median, "fwd_ms_min": lo, "fwd_ms_max": hi}

    # one noisy sample (2.94x on the median) whose range overlaps torch's: not a speedup
    rows = add_speedups([row("torch", 2.94, 0.9, 3.1), row("noisy", 1.0, 0.95, 1.2), row("fast", 0.5, 0.45, 0.6),
                         row("slow", 5.0, 4.0, 6.0)])
    verdicts = {r["provider"]: (round(r["fwd_speedup_vs_torch"], 2), r["fwd_verdict_vs_torch"]) for r in rows}
    assert verdicts == {"torch": (1.0, "within spread"), "noisy": (2.94, "within spread"),
                        "fast": (5.88, "faster"), "slow": (0.59, "slower")}


def test_bench_verdict_leaves_out_one_spike_on_each_side() -> None:
    """From five samples on, the range behind a verdict runs from the second fastest to the second
    slowest sample: one load spike (or one lucky sample) cannot decide it, two can."""
    from normkit.tools.bench import add_speedups, trimmed_range

    assert trimmed_range([3.0, 1.0, 2.0, 9.0]) == (1.0, 9.0)
    assert trimmed_range([5.0, 1.0, 2.0, 3.0, 4.0]) == (2.0, 4.0)
    # more samples, the same share of spikes left out: three at each end of 21
    spiky = [0.1, 0.2, 0.3] + [1.0 + i / 8 for i in range(15)] + [7.0, 8.0, 9.0]
    assert trimmed_range(spiky) == (1.0, 2.75)
    assert trimmed_range(spiky[1:-1]) == (1.0, 2.75)  # 19 samples: two at each end
    assert trimmed_range(spiky + [6.0]) == (1.0, 6.0)  # 22 samples, four slow spikes: one stays

    def row(provider: str, samples: list[float]) -> dict[str, object]:
        lo, hi = trimmed_range(samples)
        return {"op": "rms_norm", "shape": "64x64", "groups": 0, "dtype": "float32", "threads": 1,
                "provider": provider, "fwd_ms": sorted(samples)[len(samples) // 2], "fwd_ms_min": min(samples),
                "fwd_ms_max": max(samples), "fwd_ms_lo": lo, "fwd_ms_hi": hi}

    torch_samples = [2.0, 2.1, 2.2, 2.3, 0.9]  # one lucky sample of the baseline
    rows = add_speedups([row("torch", torch_samples), row("spiked", [1.0, 1.1, 1.2, 1.3, 3.5]),
                         row("twice", [1.0, 1.1, 1.2, 3.0, 3.5])])
    verdicts = {r["provider"]: r["fwd_verdict_vs_torch"] for r in rows}
    assert verdicts == {"torch": "within spread", "spiked": "faster", "twice": "within spread"}


def test_bench_interleaves_providers_and_rotates_the_order() -> None:
    from normkit.tools.bench import _interleaved

    calls: list[str] = []

    class Timer:
        def __init__(self, name: str) -> None:
            self.name = name

        def sample_ms(self) -> float:
            calls.append(self.name)
            return float(len(calls))

    samples = _interleaved({n: Timer(n) for n in "abc"}, 3)  # type: ignore[misc]
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert samples == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}


def test_bench_reports_compile_failure_as_an_error_row(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_compile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "bench.json"
    assert run_main("bench", "--op", "rms_norm", "--shapes", "32x64", "--budget", "0.01", "--provider", "torch",
                    "--provider", "torch.compile", "--json", str(out)) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["torch"]["fwd_ms"] > 0
    assert "no C++ compiler" in rows["torch.compile"]["error"] and "fwd_ms" not in rows["torch.compile"]


# --- compare -----------------------------------------------------------------------------------


def test_compare_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    assert run_main("compare", "--quick", "--json", str(out), "--png", str(png)) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["batch_sizes"] == [8, 32]
    assert set(result["accuracy"]) == {"BatchNorm", "GroupNorm", "LayerNorm2d", "InstanceNorm", "RMSNorm2d", "none"}
    for per_batch in result["accuracy"].values():
        for cell in per_batch.values():
            assert 0.0 <= cell["mean"] <= 1.0 and len(cell["runs"]) == 1
    assert all(len(c["loss"]) > 0 for per in result["loss_curves"].values() for c in per.values())
    assert result["verdict"]["text"] in " ".join(text.split())  # wrapped to the terminal
    # one seed: no noise estimate, so no verdict, and no "± 0.0" cells
    assert result["verdict"]["shows_trend"] is None and result["verdict"]["text"].startswith("No verdict from one seed")
    assert "±" not in text
    # a quick run still learns: well above chance (10%) for the digits
    assert max(c["mean"] for per in result["accuracy"].values() for c in per.values()) > 0.3
    assert_png(png)


@pytest.mark.parametrize("x_shape", [(48, 6, 6), (48, 3, 6, 6)])
def test_compare_on_user_data(tmp_path: Path, x_shape: tuple[int, ...]) -> None:
    gen = np.random.default_rng(0)
    y = np.arange(48) % 2
    x = gen.normal(size=x_shape).astype(np.float32) + y.reshape(-1, *[1] * (len(x_shape) - 1))
    path = tmp_path / "mine.npz"
    np.savez(path, x=x, y=y)
    out = tmp_path / "compare.json"
    assert run_main("compare", "--data", str(path), "--norm", "BatchNorm", "--norm", "GroupNorm", "--batch-sizes",
                    "4,8", "--seeds", "1", "--epochs", "1", "--workers", "1", "--json", str(out)) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "mine.npz" and result["train_size"] + result["val_size"] == 48


def test_verdict_reads_the_numbers() -> None:
    def cells(values: dict[int, list[float]]) -> dict[str, dict[str, object]]:
        return {str(b): {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "runs": v}
                for b, v in values.items()}

    gn = cells({2: [0.95, 0.96, 0.95], 64: [0.95, 0.95, 0.96]})
    degrading = cells({2: [0.80, 0.82, 0.81], 64: [0.96, 0.95, 0.96]})
    assert verdict({"BatchNorm": degrading, "GroupNorm": gn}, [2, 64])["shows_trend"] is True
    assert verdict({"BatchNorm": gn, "GroupNorm": gn}, [2, 64])["shows_trend"] is False
    assert verdict({"BatchNorm": degrading, "GroupNorm": degrading}, [2, 64])["shows_trend"] is False
    assert verdict({"GroupNorm": gn}, [2, 64])["shows_trend"] is None
    # the words follow the numbers: a rise is a rise, beyond the noise when it is
    text = verdict({"BatchNorm": cells({2: [0.95, 0.96, 0.95], 64: [0.80, 0.83, 0.81]}), "GroupNorm": gn},
                   [2, 64])["text"]
    assert "BatchNorm does not fall beyond the noise" in text
    assert "BatchNorm's accuracy rises by 14.0 points, beyond the noise (+-" in text
    assert "GroupNorm's accuracy does not change, within the noise (+-" in text
    one_seed = verdict({"BatchNorm": cells({2: [0.8], 64: [0.96]}), "GroupNorm": cells({2: [0.95], 64: [0.95]})},
                       [2, 64])
    assert one_seed["shows_trend"] is None and one_seed["batchnorm_noise"] is None
    assert "No verdict from one seed" in one_seed["text"] and "falls by 16.0 points" in one_seed["text"]


def test_compare_optimizer_is_torch_adamw() -> None:
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    theirs = [p.clone().requires_grad_() for p in ours]
    opt = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=1e-2)
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, g in zip(theirs, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        _adamw_step(ours, grads, m, v, step, 1e-2, 1e-2)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


# --- the console script ------------------------------------------------------------------------


def test_console_script_piped_output() -> None:
    script = shutil.which("normkit", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "normkit"]
    done = subprocess.run([*command, "explain", "bn", "--shape", "2,3,4,5"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 means and 3 variances, each over 40 elements" in done.stdout
    assert "\x1b[" not in done.stdout  # piped: plain text, no terminal escapes


# --- the package ---------------------------------------------------------------------------------


def test_ddp_accepts_normkit_syncbatchnorm_on_the_cpu(tmp_path: Path) -> None:
    import torch.distributed as dist

    import normkit.parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        net(torch.randn(2, 3, 6, 6))
        plain = normkit.convert_sync_batchnorm(net)
        reference = copy.deepcopy(plain)
        model = normkit.parallel.DistributedDataParallel(plain)
        x = torch.randn(4, 3, 6, 6)
        dy = torch.randn(4, 2)
        model(x).backward(dy)
        reference(x).backward(dy)
        for (name, p), q in zip(plain.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        # torch's own SyncBatchNorm is still refused on the CPU, with torch's error
        with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
            normkit.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3)))
    finally:
        dist.destroy_process_group()


def test_package_metadata() -> None:
    from importlib.metadata import metadata, requires
    from importlib.resources import files

    meta = metadata("normkit")
    assert meta["License-Expression"] == "MIT"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert files("normkit").joinpath("py.typed").is_file()
    torch_req = [r for r in requires("normkit") if r.startswith("torch")]
    assert torch_req and all("<" in r for r in torch_req)  # the range that is tested, not an open floor


# --- normkit.testing ---------------------------------------------------------------------------


def test_testing_docstring_example_runs() -> None:
    import normkit.testing

    doc = normkit.testing.__doc__
    example = doc[doc.index("    import torch\n"):doc.index(":func:`assert_close_to_reference` is")]
    exec(compile("\n".join(line[4:] for line in example.splitlines()), "normkit.testing example", "exec"), {})


def test_testing_bound_catches_a_wrong_kernel() -> None:
    from normkit.testing import TOLERANCES, assert_within_bound, bound

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 300, generator=gen, dtype=torch.float64)
    w = torch.randn(300, generator=gen, dtype=torch.float64)

    def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * w).to(x.dtype)

    reference = torch.nn.functional.rms_norm(x, (300,), w, 1e-6)
    baseline = torch.nn.functional.rms_norm(x.bfloat16(), (300,), w.bfloat16(), 1e-6)
    good = bound(rms(x.bfloat16(), w.bfloat16(), 1e-6), reference, baseline)
    assert good.ok and good.limit == pytest.approx(TOLERANCES[torch.bfloat16].factor * good.baseline_error
                                                   + TOLERANCES[torch.bfloat16].atol * reference.abs().max().item())
    # statistics over the batch axis instead of the features: caught
    xb = x.bfloat16().float()
    sloppy = (xb * torch.rsqrt(xb.square().mean(0, keepdim=True) + 1e-6) * w.float()).bfloat16()
    with pytest.raises(AssertionError, match="y: error .* vs float64 > bound"):
        assert_within_bound({"y": sloppy}, {"y": reference}, {"y": baseline})
    assert all(t.reason for t in TOLERANCES.values())  # every number says why
