"""Fault injection for the cleaning stage (issue 13, items 2, 3 and the one-image class of 8), on real
files: torn and half-decoded decisions lines, undo across sessions, writes into cleaned_data, crafted
relabel labels, kill -9 mid-apply, two applies at once, and a class of one image in `clean --report`.

Every probe checks that nothing under scrape/ changed (bytes and inodes) and that the CLI printed
one line, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, copy_subset, run_cli

from toolkit.core.images import sha256_file


def raw_state(folder: Path) -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, inode, link count) of every file under folder."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(folder).as_posix()] = (sha256_file(p), st.st_ino, st.st_nlink)
    return out


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def data_files(folder: Path) -> dict[str, str]:
    """The cleaned set: relative path -> sha256 (decisions, reports, caches left out)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in folder.rglob("*")
            if p.is_file() and not p.relative_to(folder).as_posix().startswith((".", "report"))
            and p.name not in ("decisions.jsonl", "applied.json")}


def assert_one_line(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr


@pytest.fixture(scope="module")
def raw_cache(tmp_path_factory, clothing_small) -> Path:
    """Real photos, copied once: hat 50, pants 150, shoes 100 (300 files)."""
    root = tmp_path_factory.mktemp("raw-cache")
    for name, n in (("hat", 50), ("pants", 150), ("shoes", 100)):
        copy_subset(clothing_small / "train", root, [name], n, seed=3)
    return root


@pytest.fixture
def proj(tmp_path, raw_cache):
    """A project with scrape/f/ (the 300 photos), settings.ini and the spec."""
    from toolkit.settings import load_settings

    shutil.copytree(raw_cache, tmp_path / "scrape" / "f")
    (tmp_path / "settings.ini").write_text("[f]\nsize = 64\n")
    spec = load_settings(tmp_path / "settings.ini").get("f")
    return {"root": tmp_path, "raw": tmp_path / "scrape" / "f", "spec": spec,
            "before": raw_state(tmp_path / "scrape" / "f")}


def files_of(proj, klass: str) -> list[str]:
    return sorted(f"{klass}/{p.name}" for p in (proj["raw"] / klass).iterdir())


# ---------------------------------------------------------------- decisions.jsonl after a crash


def test_complete_last_line_without_newline_then_a_new_decision(proj):
    from toolkit.stages.clean.decisions import DecisionLog

    log = DecisionLog(proj["spec"].cleaned_dir)
    first = log.record(files_of(proj, "hat")[0], "delete")
    text = log.path.read_bytes()
    log.path.write_bytes(text.rstrip(b"\n"))  # a crash after the JSON, before its newline
    second = log.record(files_of(proj, "hat")[1], "delete")
    assert [e["id"] for e in log.entries()] == [first["id"], second["id"]] and log.bad_lines == 0
    assert log.path.read_bytes().endswith(b"\n") and log.path.read_bytes().count(b"\n") == 2


def test_torn_last_line_then_a_new_decision(proj):
    from toolkit.stages.clean.decisions import DecisionLog

    log = DecisionLog(proj["spec"].cleaned_dir)
    first = log.record(files_of(proj, "hat")[0], "delete")
    with open(log.path, "ab") as handle:
        handle.write(b'{"id": "torn", "time": "2026-01-01", "act')  # a crash mid-write
    second = log.record(files_of(proj, "hat")[1], "relabel", "pants")
    assert [e["id"] for e in log.entries()] == [first["id"], second["id"]]
    assert log.bad_lines == 1  # the torn line is skipped and counted, never glued to the next one
    assert set(log.state()) == {first["file"], second["file"]}


def test_tear_inside_a_utf8_character_then_cli_undo(proj):
    from toolkit.stages.clean.decisions import DecisionLog

    hat = files_of(proj, "hat")
    log = DecisionLog(proj["spec"].cleaned_dir)
    log.record(hat[0], "delete", reason="blurry")
    line = (json.dumps({"id": "x1", "time": "t", "session": log.session, "action": "delete",
                        "file": "hat/café-ü.jpg", "reason": "ünïcödé"}, ensure_ascii=False) + "\n").encode()
    cut = line.index("ü".encode()) + 1  # inside the two bytes of 'ü'
    with open(log.path, "ab") as handle:
        handle.write(line[:cut])
    assert [e["file"] for e in log.entries()] == [hat[0]] and log.bad_lines == 1
    # and a tear in the middle of the file (a bad byte on a line of its own)
    with open(log.path, "ab") as handle:
        handle.write(b"\n\xff\xfe garbage\n")
    log.record(hat[1], "delete")
    done = run_cli("clean", "f", "--undo", cwd=proj["root"])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and f"undid delete {hat[1]}" in done.stdout, done.stdout
    assert "skipped 2 unreadable line(s)" in done.stdout
    assert set(DecisionLog(proj["spec"].cleaned_dir).state()) == {hat[0]}
    assert raw_state(proj["raw"]) == proj["before"]


# ---------------------------------------------------------------- undo per session


def test_undo_is_per_session(proj):
    from toolkit.stages.clean.decisions import DecisionLog

    hat, pants = files_of(proj, "hat"), files_of(proj, "pants")
    alice = DecisionLog(proj["spec"].cleaned_dir)  # two widgets (two people) on one classifier
    bob = DecisionLog(proj["spec"].cleaned_dir)
    assert alice.session != bob.session
    alice.record(hat[0], "delete")
    alice.record(hat[1], "delete")
    bob.record(pants[0], "delete")
    bob.record(pants[1], "relabel", "shoes")
    assert alice.undo()["file"] == hat[1]  # Alice's own last decision, not Bob's later one
    assert set(alice.state()) == {hat[0], pants[0], pants[1]}
    alice.record(hat[2], "keep")
    assert alice.undo_all() == 2  # all of Alice's, none of Bob's
    assert set(bob.state()) == {pants[0], pants[1]}
    assert alice.undo() is None and alice.undo_all() == 0
    # a new widget (a new session) cannot undo Bob's decisions by "undo last"
    assert DecisionLog(proj["spec"].cleaned_dir).undo() is None
    # the CLI: default is the session that decided last, named; --session picks one
    carol = DecisionLog(proj["spec"].cleaned_dir)
    carol.record(hat[3], "delete")
    done = run_cli("clean", "f", "--undo", cwd=proj["root"])
    assert done.returncode == 0 and f"undid delete {hat[3]} (session {carol.session}" in done.stdout, done.stdout
    assert f"other sessions with decisions: {bob.session} (2)" in done.stdout
    done = run_cli("clean", "f", "--undo", "--session", bob.session, cwd=proj["root"])
    assert done.returncode == 0 and f"undid relabel {pants[1]} (session {bob.session}" in done.stdout
    done = run_cli("clean", "f", "--undo-all", "--session", bob.session, cwd=proj["root"])
    assert done.returncode == 0 and f"undid 1 decision(s) of session {bob.session}" in done.stdout
    assert DecisionLog(proj["spec"].cleaned_dir).state() == {}
    done = run_cli("clean", "f", "--undo", "--session", "nobody", cwd=proj["root"])
    assert done.returncode == 2
    assert_one_line(done)
    assert "no decisions of session 'nobody'" in done.stderr
    done = run_cli("clean", "f", "--undo", cwd=proj["root"])
    assert done.returncode == 0 and done.stdout.strip() == "nothing to undo"


def test_widget_undo_undoes_only_its_own_session(proj, raw_cache):
    from toolkit.stages.clean.decisions import DecisionLog
    from toolkit.stages.clean.rank import Rankings, list_raw_images
    from toolkit.ui.clean_app import CleanerWidget

    spec = proj["spec"]
    raw = list_raw_images(spec)
    rows = [{"file": f, "given": y, "predicted": y, "prob": 1.0, "score": 1.0, "issue": False,
             "split": "train"} for f, y in zip(raw.rel, raw.labels, strict=True)]
    rankings = Rankings(raw.root, raw.classes, rows, [], rows, [], [])
    w = CleanerWidget(spec, raw=raw, rankings=rankings, page_size=4)
    other = DecisionLog(spec.cleaned_dir)
    w.tiles[0].decision.value = "delete"
    other.record(w.tiles[1].file, "delete")  # someone else, later
    w.undo()
    assert set(w.decisions.state()) == {w.tiles[1].file} and w.error.value == ""
    w.tiles[2].decision.value = "keep"
    w.tiles[3].decision.value = "delete"
    w.undo_all()
    assert set(DecisionLog(spec.cleaned_dir).state()) == {w.tiles[1].file}


# ---------------------------------------------------------------- apply: copies, labels, paths


def test_appending_to_a_cleaned_file_leaves_scrape_unchanged(proj):
    spec = proj["spec"]
    done = run_cli("clean", "f", "--apply", cwd=proj["root"])
    assert done.returncode == 0 and "300 copies" in done.stdout, done.stdout + done.stderr
    assert data_files(spec.cleaned_dir) == {k: v[0] for k, v in proj["before"].items()}
    for rel in ("hat/" + sorted(os.listdir(proj["raw"] / "hat"))[0], files_of(proj, "pants")[5]):
        cleaned = spec.cleaned_dir / rel
        assert cleaned.stat().st_ino != (proj["raw"] / rel).stat().st_ino
        with open(cleaned, "ab") as handle:
            handle.write(b"x")
        cleaned.chmod(0o600)
    assert raw_state(proj["raw"]) == proj["before"]  # bytes, inodes and link counts (1) unchanged
    assert all(nlink == 1 for _, _, nlink in proj["before"].values())


CRAFTED = ["../../../escaped", "../escaped2", "/tmp/abs-escaped", "a/../../b", "pants/../../c", ".hidden",
           "_under", "..", ".", "", "decisions.jsonl", "report-x.csv", "x\ny", "tab\there", "a\\..\\..\\d",
           "pants/", "x" * 300]


def test_crafted_relabel_labels_are_refused(proj):
    from toolkit.core.errors import ToolkitError
    from toolkit.stages.clean.decisions import DecisionLog

    spec, root = proj["spec"], proj["root"]
    log = DecisionLog(spec.cleaned_dir)
    hat = files_of(proj, "hat")
    for label in CRAFTED:  # the API refuses them up front
        with pytest.raises(ToolkitError):
            log.record(hat[0], "relabel", label)
    good = log.record(hat[-1], "relabel", "pants")
    # ... and a hand-edited (or hostile) decisions.jsonl is refused at apply, one line per decision
    with open(log.path, "a", encoding="utf-8") as handle:
        for i, label in enumerate(CRAFTED):
            handle.write(json.dumps({"id": f"evil{i}", "time": "t", "session": "evil", "action": "relabel",
                                     "file": hat[i], "label": label}) + "\n")
        handle.write(json.dumps({"id": "evil-nt", "time": "t", "session": "evil", "action": "relabel",
                                 "file": hat[30], "label": ["not", "text"]}) + "\n")
    outside_before = tree(root) - {p for p in tree(root) if p.startswith("cleaned_data")}
    for attempt in range(2):  # a later apply does not crash either
        done = run_cli("clean", "f", "--apply", cwd=root)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        refused = [line for line in done.stderr.splitlines() if line.startswith("refused: decision evil")]
        assert len(refused) == len(CRAFTED) + 1 == len(done.stderr.splitlines()), done.stderr
        outside = tree(root) - {p for p in tree(root) if p.startswith("cleaned_data")}
        assert outside == outside_before, outside ^ outside_before
        assert not (root.parent / "escaped").exists() and not Path("/tmp/abs-escaped").exists()
        cleaned = data_files(spec.cleaned_dir)
        assert all(f"hat/{Path(f).name}" in cleaned for f in hat[: len(CRAFTED)])  # they keep their label
        assert f"pants/{Path(good['file']).name}" in cleaned
        assert {p.split("/", 1)[0] for p in cleaned} == {"hat", "pants", "shoes"}, attempt
    done = run_cli("clean", "f", "--dry-run", cwd=root)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert len([x for x in done.stderr.splitlines() if x.startswith("would refuse: decision evil")]) == len(CRAFTED) + 1
    assert raw_state(proj["raw"]) == proj["before"]


def test_a_symlink_in_cleaned_data_is_not_followed(proj, tmp_path):
    spec = proj["spec"]
    done = run_cli("clean", "f", "--apply", cwd=proj["root"])
    assert done.returncode == 0
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("x")
    (spec.cleaned_dir / "link").symlink_to(secret)
    done = run_cli("clean", "f", "--apply", cwd=proj["root"])
    assert done.returncode == 0, done.stderr
    assert not (spec.cleaned_dir / "link").exists() and (secret / "key.txt").read_text() == "x"


# ---------------------------------------------------------------- kill -9 and two applies at once


def start_apply(proj) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolkit", "clean", "f", "--apply", "--quiet"],
                            cwd=proj["root"], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_kill_9_mid_apply_then_apply_again(proj):
    from toolkit.stages.clean.decisions import DecisionLog

    spec, parent = proj["spec"], proj["root"] / "cleaned_data"
    log = DecisionLog(spec.cleaned_dir)
    pants = files_of(proj, "pants")
    log.record(pants[0], "delete")
    assert run_cli("clean", "f", "--apply", cwd=proj["root"]).returncode == 0
    old = data_files(spec.cleaned_dir)
    log.record_many(pants[1:40], "relabel", "shoes")
    expected_paths = {f"shoes/{Path(f).name}" for f in pants[1:40]}
    killed_mid, n_state = 0, 40
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1):
        proc = start_apply(proj)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list(parent.glob(f".f.apply-{proc.pid}-*")):  # this run is building its new set
                break
            time.sleep(0.0005)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid += bool(list(parent.glob(f".f.apply-{proc.pid}-*")))
        proc.wait(timeout=60)
        now = data_files(spec.cleaned_dir)
        assert now == old or (expected_paths <= set(now) and len(now) == len(old)), delay  # old set or new, whole
        assert log.path.is_file() and len(log.state()) == n_state
        assert raw_state(proj["raw"]) == proj["before"]
        if now != old:  # that run finished: undo one, so the next one has something to do again
            log.undo()
            n_state -= 1
            expected_paths = {f"shoes/{Path(f).name}" for f in pants[1:40] if f in log.state()}
            old = now
    print(f"kill -9 probes: {len((0.0, 0.005, 0.02, 0.05, 0.1))}, landed mid-build: {killed_mid}")
    assert killed_mid >= 1, "no kill landed during the build; the probe proved nothing"
    done = run_cli("clean", "f", "--apply", cwd=proj["root"])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    final = data_files(spec.cleaned_dir)
    assert expected_paths <= set(final) and len(final) == 299
    applied = json.loads((spec.cleaned_dir / "applied.json").read_text())
    assert set(applied["files"].values()) == set(final)
    assert not list(parent.glob(".f.apply-*")) and not list(parent.glob(".f.old-*"))
    assert raw_state(proj["raw"]) == proj["before"]


def test_a_second_apply_while_one_runs_exits_2_in_one_line(proj):
    from toolkit.stages.clean.decisions import apply_lock

    spec = proj["spec"]
    with apply_lock(spec.cleaned_dir):  # a real apply holding the lock, in this process
        done = run_cli("clean", "f", "--apply", cwd=proj["root"])
    assert done.returncode == 2
    assert_one_line(done)
    assert "another apply of f is running (pid" in done.stderr and str(os.getpid()) in done.stderr
    assert not spec.cleaned_dir.exists() or not data_files(spec.cleaned_dir)
    # two real applies started together: each finishes or says who holds the lock; the set is whole
    procs = [start_apply(proj) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    for _out, err, rc in results:
        assert rc in (0, 2) and "Traceback" not in err, err
        if rc == 2:
            assert len(err.strip().splitlines()) == 1 and "another apply" in err
    assert 0 in [rc for _, _, rc in results]
    assert data_files(spec.cleaned_dir) == {k: v[0] for k, v in proj["before"].items()}
    assert not list((proj["root"] / "cleaned_data").glob(".f.apply-*"))
    assert raw_state(proj["raw"]) == proj["before"]


# ---------------------------------------------------------------- rank: a class of one image


def test_report_with_a_one_image_class(tmp_path, clothing_small):
    raw = copy_subset(clothing_small / "train", tmp_path / "scrape" / "one", ["hat", "pants"], 8, seed=2)
    copy_subset(clothing_small / "train", raw, ["shoes"], 1, seed=2)
    (tmp_path / "settings.ini").write_text("[one]\nsize = 64\n")
    before = raw_state(raw)
    done = run_cli("clean", "one", "--report", "--no-model", "--size", "64", "--quiet", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "shoes (1)" in warnings[0], done.stderr
    report = json.loads((tmp_path / "cleaned_data" / "one" / "report.json").read_text())
    rows = report["all"]["label_issues"]
    assert len(rows) == 17 and [r["scored"] for r in rows][-1] is False and rows[-1]["given"] == "shoes"
    assert report["warnings"] == [warnings[0][len("warning: "):]]
    # two classes, one of them a single image: nothing can be scored, still a report
    shutil.rmtree(raw / "pants")
    done = run_cli("clean", "one", "--report", "--no-model", "--size", "64", "--quiet", cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "label issues not scored: out-of-fold scoring needs two classes" in done.stderr
    assert (tmp_path / "cleaned_data" / "one" / "report-label_issues.csv").is_file()
    assert raw_state(raw) == {k: v for k, v in before.items() if not k.startswith("pants/")}


def test_out_of_fold_probs_with_tiny_classes():
    import numpy as np

    from toolkit.stages.clean.rank import label_issue_table, out_of_fold_probs

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(23, 16))
    y = np.array([0] * 10 + [1] * 10 + [2] * 2 + [3])  # 2 images: 2 folds; 1 image: not scored
    warnings: list[str] = []
    probs = out_of_fold_probs(emb, y, 4, folds=5, warnings=warnings, class_names=list("abcd"))
    assert probs.shape == (23, 4) and np.allclose(probs.sum(1), 1) and len(warnings) == 1 and "d (1)" in warnings[0]
    rows = label_issue_table([str(i) for i in range(23)], [list("abcd")[c] for c in y], list("abcd"), probs,
                             ["train"] * 23)
    assert rows[-1]["file"] == "22" and rows[-1]["scored"] is False and not rows[-1]["issue"]
