"""memlend sim: trace readers, size parsing, replay, and the command line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memlend.cli import main
from memlend.errors import UserError
from memlend.policies import POLICIES, make_policy
from memlend.sim import (
    hotscan_trace,
    load_trace,
    miss_ratios,
    parse_cache_size,
    parse_policies,
    read_csv_trace,
    read_lines_trace,
    simulate,
)

# ------------------------------------------------------------------ readers


def test_lines_trace_skips_markers_and_blanks(tmp_path: Path) -> None:
    p = tmp_path / "t.trace"
    p.write_bytes(b"*\n1\r\n2\n\n  3 \n* marker\n1\n")
    assert read_lines_trace(p) == [1, 2, 3, 1]


def test_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    gz = tmp_path / "looks-plain.txt"
    gz.write_bytes(gzip.compress(b"5\n6\n5\n"))
    plain = tmp_path / "looks-gzipped.gz"
    plain.write_bytes(b"7\n8\n")
    assert read_lines_trace(gz) == [5, 6, 5]
    assert read_lines_trace(plain) == [7, 8]


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.trace"
    p.write_text("1\n2\nthree\n")
    with pytest.raises(UserError, match=r"bad\.trace, line 3: expected a block number"):
        read_lines_trace(p)


def test_truncated_gzip_is_a_user_error(tmp_path: Path) -> None:
    p = tmp_path / "cut.gz"
    p.write_bytes(gzip.compress(b"1\n" * 10000)[:40])
    with pytest.raises(UserError, match="gzip"):
        read_lines_trace(p)


def test_missing_file() -> None:
    with pytest.raises(UserError, match="no such file"):
        load_trace("/nonexistent/trace")


def test_empty_trace(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_text("*\n\n")
    with pytest.raises(UserError, match="no accesses"):
        load_trace(str(p))


def test_csv_rows_map_to_covered_blocks(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(
        "time,Offset,size,op\n"
        "0,0,4096,R\n"  # block 0
        "1,4095,2,R\n"  # straddles blocks 0 and 1
        "2,8192,12288,W\n"  # blocks 2, 3, 4
        "3,100,0,R\n"  # empty request: no block
    )
    assert read_csv_trace(p, 4096) == [0, 0, 1, 2, 3, 4]
    assert read_csv_trace(p, 8192) == [0, 0, 1, 2]


def test_csv_without_columns(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("time,lba\n1,2\n")
    with pytest.raises(UserError, match="'offset' and 'size' columns"):
        read_csv_trace(p)


def test_csv_bad_row(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text("offset,size\n0,4096\nx,4096\n")
    with pytest.raises(UserError, match=r"t\.csv, line 3"):
        read_csv_trace(p)


def test_synthetic_hotscan_is_deterministic() -> None:
    a = load_trace("synthetic:hotscan")
    assert a == hotscan_trace()
    assert len(a) == 90_000
    assert len(set(a)) == 30_200
    with pytest.raises(UserError, match="unknown synthetic"):
        load_trace("synthetic:nope")


# ------------------------------------------------------------- sizes, names


@pytest.mark.parametrize(
    ("text", "blocks"),
    [("500", 500), ("10%", 100), ("0.01%", 1), ("2.5%", 25), ("64K", 16), ("1M", 256)],
)
def test_cache_sizes(text: str, blocks: int) -> None:
    assert parse_cache_size(text, 1000, 4096) == blocks


@pytest.mark.parametrize("text", ["0", "-5", "-5%", "0%", "12XB", "", "1.5", "nan%", "1K"])
def test_bad_cache_sizes(text: str) -> None:
    # 1K is 1024 bytes: less than one 4 KiB block.
    with pytest.raises(UserError, match="invalid cache size"):
        parse_cache_size(text, 1000, 4096)


def test_policy_names() -> None:
    assert parse_policies(None)[0] == "lru"
    assert sorted(parse_policies(None)) == sorted(POLICIES)
    assert parse_policies("all") == parse_policies(None)
    assert parse_policies("LRU, arc,lru") == ["lru", "arc"]
    with pytest.raises(UserError, match="unknown policy 'nope'"):
        parse_policies("lru,nope")


# ------------------------------------------------------------------ replay


def test_simulate_counts_misses_like_the_policy() -> None:
    trace = [1, 2, 3, 1, 4, 1, 2, 5, 1, 2]
    res = simulate(trace, "lru", 3)
    p = make_policy("lru", 3)
    assert res.misses == sum(not p.access(k) for k in trace)
    assert res.accesses == len(trace)
    assert res.miss_ratio == res.misses / len(trace)


def test_miss_ratios_grid() -> None:
    trace = [i % 7 for i in range(100)]
    res = miss_ratios(trace, ["lru", "arc"], [3, 7])
    assert [(r.size_blocks, r.policy) for r in res] == [
        (3, "lru"),
        (3, "arc"),
        (7, "lru"),
        (7, "arc"),
    ]
    assert res[0].misses == 100  # a loop larger than LRU's cache: every access misses
    assert res[2].misses == res[3].misses == 7  # everything fits: compulsory misses only


# --------------------------------------------------------------------- CLI


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    p = tmp_path / "t.trace.gz"
    p.write_bytes(gzip.compress("\n".join(str(i % 50) for i in range(2000)).encode()))
    return p


def test_cli_json(trace_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sim", str(trace_file), "--policy", "lru,s3fifo", "--size", "10,50%", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4
    assert set(rows[0]) == {
        "trace",
        "policy",
        "size",
        "size_blocks",
        "accesses",
        "unique_blocks",
        "misses",
        "miss_ratio",
    }
    by = {(r["policy"], r["size"]): r for r in rows}
    assert by[("lru", "50%")]["size_blocks"] == 25
    assert by[("lru", "10")]["accesses"] == 2000
    assert by[("lru", "10")]["unique_blocks"] == 50
    assert by[("lru", "10")]["misses"] == 2000  # a 50-block loop through 10 LRU slots


def test_cli_table_and_plot(
    trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "curves.png"
    rc = main(["sim", str(trace_file), "synthetic:hotscan", "--size", "1%,5%", "--plot", str(png)])
    assert rc == 0
    out = capsys.readouterr().out
    for name in POLICIES:
        assert name in out
    assert "synthetic:hotscan" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/nonexistent/x.trace"], "no such file"),
        (["{trace}", "--policy", "bogus"], "unknown policy"),
        (["{trace}", "--size", "12XB"], "invalid cache size '12XB'"),
        (["{trace}", "--size", "0"], "invalid cache size '0'"),
        (["{trace}", "--size=-5%"], "invalid cache size '-5%'"),
        (["{trace}", "--format", "csv"], "'offset' and 'size' columns"),
        (["{bad}"], "line 2: expected a block number"),
        (["{trace}", "--block-size", "0"], "invalid size '0'"),
        (["{trace}", "--sample", "0"], "invalid sampling rate"),
        (["{trace}", "--sample", "1.5"], "invalid sampling rate"),
    ],
)
def test_cli_errors_are_one_line(
    argv: list[str],
    message: str,
    trace_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.trace"
    bad.write_text("1\nx\n")
    argv = [a.format(trace=trace_file, bad=bad) for a in argv]
    rc = main(["sim", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.startswith("memlend: ")
    assert err.count("\n") == 1


def test_cli_error_has_no_traceback_in_a_real_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memlend", "sim", str(tmp_path / "missing"), "--size", "12XB"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_cli_help_mentions_formats() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memlend", "sim", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for word in ("--policy", "--size", "--format", "--block-size", "--json", "--plot", "10%"):
        assert word in proc.stdout


def test_reread_tradeoff_traces_split_the_policies() -> None:
    # Same 18,432-block prefix; LIRS keeps its oldest blocks, LRU and lirs-lazy the
    # newest, so each misses the whole ending the other hits (docs/policies.md).
    reread, loop = load_trace("synthetic:scan-reread"), load_trace("synthetic:scan-loop")
    assert reread[:18432] == loop[:18432] == list(range(18432))
    ratios = {
        p: (simulate(reread, p, 3400).miss_ratio, simulate(loop, p, 3400).miss_ratio)
        for p in ("lru", "lirs", "lirs-lazy")
    }
    assert ratios == {"lru": (0.9, 1.0), "lirs": (1.0, 0.9), "lirs-lazy": (0.9, 1.0)}
