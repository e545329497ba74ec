"""Credentials in the environment never reach the run directory, the logged config or the logs."""

from __future__ import annotations

from conftest import TINY, run_cli

SECRETS = {
    "WANDB_API_KEY": "fakewandbkey0123456789abcdef0123456789abcd",
    "HF_TOKEN": "hf_fakeTOKENabcdefghijklmnopqrstuvwxyz",
    "HUGGING_FACE_HUB_TOKEN": "hf_fakeHUBtokenZYXWVUTSRQPONMLKJIH",
    "OPENAI_API_KEY": "sk-fakeopenai0123456789",
}


def test_fake_tokens_appear_in_no_file_of_the_run(tmp_path):
    run_dir = tmp_path / "run"
    # wandb.mode=offline: with a key in the environment, auto would try the (absent) service
    result = run_cli([*TINY, "training.save_steps=2", f"hydra.run.dir={run_dir}"], env=SECRETS, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    # what must be there for the check to mean something: W&B's binary log, logs, config, checkpoints
    names = {p.name for p in files}
    assert {"metrics.json", "config.json", "config.yaml", "trainer_state.json", "optimizer.pt"} <= names
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".log" for p in files)
    leaks = [(str(p.relative_to(run_dir)), name) for p in files for name, value in SECRETS.items()
             if value.encode() in p.read_bytes()]
    assert leaks == []
    for name, value in SECRETS.items():
        assert value not in result.stdout and value not in result.stderr, name


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    from conftest import compose

    assert all(compose([f"model={m}"]).model.trust_remote_code is False
               for m in ("bloomz-560m", "smollm2-135m", "tiny-llama", "tiny-bloom"))
    assert compose(["model.trust_remote_code=true"]).model.trust_remote_code is True
