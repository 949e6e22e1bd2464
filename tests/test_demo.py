"""The main job (`fluxrl demo`) end to end at toy sizes: every output it promises is written."""

import os

import pytest

from fluxrl import demo


@pytest.mark.slow
def test_demo_writes_curves_intentions_and_table(tmp_path, monkeypatch):
    for name, value in dict(EPISODES=2, VAL_EPISODES=1, PRETRAIN_STEPS=20, FINETUNE_STEPS=20, SEEDS=2,
                            EVAL_INTERVAL=10, EVAL_EPISODES=1).items():
        monkeypatch.setattr(demo, name, value)
    assert demo.run_demo(str(tmp_path / "out"), quiet=True) == 0
    out = tmp_path / "out"
    for name in ("results.md", "learning_curve.png", "intentions.png", "pretraining_loss.png", "dataset_info.txt",
                 "runs/pretrain/summary.md", "runs/finetune/summary.md", "runs/pretrain/intentions.json"):
        assert os.path.getsize(out / name) > 0, name
    table = (out / "results.md").read_text()
    assert "pre-trained BC actor (fine-tuning step 0), step 0" in table
    assert "fine-tuned InFOM, step 20" in table and "uniform random" in table
