import json

import pytest

from anyattn.cli import main


def test_train_mqar_smoke(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["train", "--task", "mqar", "--mixers", "attention,longconv", "--steps", "2", "--out", str(out),
               "--no-progress", "--threads", "1", "--seed", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "attention" in text and "longconv" in text and "best accuracy" in text
    res = json.loads((out / "results.json").read_text())
    assert res["seed"] == 3 and res["environment"]["threads"] == 1
    assert [(r["mixer"], r["steps"], r["seq_len"], r["hidden"]) for r in res["runs"]] == \
        [("attention", 2, 256, 64), ("longconv", 2, 256, 64)]
    assert (out / "quality_vs_speed.png").stat().st_size > 1000
    assert (out / "longconv" / "ckpt.pt").exists()


def test_train_lm_smoke_reports_the_corpus_baselines(tmp_path, capsys):
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    out = tmp_path / "o"
    rc = main(["train", "--task", "lm", "--mixers", "gla", "--steps", "1", "--corpus", str(corpus),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "unigram" in text and "bigram" in text and "bits/byte" in text
    c = json.loads((out / "results.json").read_text())["corpus"]
    assert c["unigram_bpb"] > c["bigram_bpb"] > 0 and len(c["sha256"]) == 64 and c["python_version"]


@pytest.mark.parametrize("args, message", [
    (["--task", "mqar", "--mixers", "attentoin"], "unknown mixer 'attentoin'"),
    (["--task", "mqar", "--mixers", "gla:heads=2"], "no option 'heads'"),
    (["--task", "mqar", "--mixers", "attention", "--corpus", "x.txt"], "--corpus is for --task lm"),
    (["--task", "lm", "--mixers", "attention", "--corpus", "/nonexistent/x.txt"], "no such file"),
    (["--task", "mqar", "--mixers", "attention", "--steps", "0"], "steps must be a positive int"),
    (["--task", "mqar", "--mixers", "attention", "--threads", "0"], "--threads"),
])
def test_train_errors_are_clear(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_train_rejects_unknown_task_and_preset(tmp_path):
    for args in (["--task", "vision", "--mixers", "attention"],
                 ["--task", "mqar", "--mixers", "attention", "--preset", "huge"]):
        with pytest.raises(SystemExit) as e:
            main(["train", *args, "--out", str(tmp_path)])
        assert e.value.code == 2


def test_report_keeps_the_best_learning_rate_per_setting():
    from anyattn.train.report import best_runs, table

    def row(mixer, group, best, metric="accuracy"):
        return {"mixer": mixer, "group": group, "setting": f"{group}-lr", "best": best, "final": best,
                "metric": metric, "params": 1, "state_size": 10, "state_grows": False, "steps": 1,
                "tokens_per_s": 1.0, "wall_s": 1.0}
    env = {"torch": "t", "python": "p", "threads": 1, "device": "cpu"}
    res = {"task": "mqar", "preset": "standard", "seed": 0, "environment": env,
           "runs": [row("a", "g1", 0.2), row("a", "g1", 0.9), row("a", "g1", 0.5), row("a", "g2", 0.1)]}
    assert [(r["group"], r["best"]) for r in best_runs(res)] == [("g1", 0.9), ("g2", 0.1)]
    res["runs"] = [row("a", "g", 3.0, "bpb"), row("a", "g", 2.5, "bpb"), row("a", "g", 2.7, "bpb")]
    assert [r["best"] for r in best_runs(res)] == [2.5]
    assert "best bpb" in table(res)
