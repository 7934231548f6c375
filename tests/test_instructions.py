"""Instruction embeddings (policy_accel/instructions.py) and instruction-conditioned observations
(envs/instruction_obs.py)."""

import numpy as np
import pytest

import envs
import policy_accel.instructions as instructions
from envs.collect import collect
from envs.dataset import load_dataset
from envs.instruction_obs import with_instructions
from policy_accel.instructions import InstructionTable

PUSH = "push the disc into the goal region"


def table(texts=(PUSH, "open the drawer")) -> InstructionTable:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(texts), 6))
    return InstructionTable(list(texts), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def test_a_table_answers_what_it_holds_and_names_what_it_lacks(monkeypatch):
    t = table()
    np.testing.assert_array_equal(t(["open the drawer", PUSH]), t.embeddings[[1, 0]])
    back = InstructionTable.from_dict(t.to_dict())
    assert back.texts == t.texts and np.array_equal(back.embeddings, t.embeddings) and back.encoder == t.encoder
    monkeypatch.setattr(instructions, "encoder_installed", lambda: False)
    with pytest.raises(KeyError, match=r"no encoder to embed them: \['close the drawer'\]"):
        t(["open the drawer", "close the drawer"])
    other = InstructionTable([PUSH], np.ones((1, 6)), encoder="another encoder")
    with pytest.raises(KeyError, match="must not be mixed"):
        other(["open the drawer"])
    with pytest.raises(ValueError, match="appears twice"):
        InstructionTable([PUSH, PUSH], np.ones((2, 6)))


def test_observations_carry_the_embedding_and_the_spec_recreates_it():
    t = table()
    env = with_instructions(envs.make_env("push2d"), t)
    obs, _ = env.reset(seed=3)
    inner, _ = envs.make_env("push2d").reset(seed=3)
    np.testing.assert_array_equal(obs, np.concatenate([inner, t([PUSH])[0]]))
    assert env.obs_layout[-1] == ("instruction", 6) and env.observation_space.shape == obs.shape
    again = envs.make_env_from_spec(env.spec_dict())
    np.testing.assert_array_equal(again.reset(seed=3)[0], obs)


def test_a_told_instruction_replaces_the_tasks_own_and_must_be_in_the_table(monkeypatch):
    t = table()
    env = with_instructions(envs.make_env("push2d"), t)
    env.told = {PUSH: "open the drawer"}
    obs, _ = env.reset(seed=3)
    np.testing.assert_array_equal(obs[-6:], t(["open the drawer"])[0])
    assert env.instruction == PUSH  # the env still runs (and scores) its own task
    monkeypatch.setattr(instructions, "encoder_installed", lambda: False)
    env.told = {PUSH: "close the drawer"}
    with pytest.raises(KeyError, match="close the drawer"):
        env.reset(seed=3)


def test_collect_records_instruction_conditioned_demos(tmp_path, monkeypatch):
    monkeypatch.setattr(InstructionTable, "build", classmethod(lambda cls, texts: table()))  # no 90 MB encoder
    path = collect("push2d", 2, seed=0, out=tmp_path / "d.zarr", progress=False, instructions=True)
    ds = load_dataset(path)
    assert ds.obs.shape[1] == envs.make_env("push2d").observation_space.shape[0] + 6
    np.testing.assert_array_equal(ds.obs[:, -6:], np.repeat(table()([PUSH]), len(ds.obs), axis=0))
    assert "instruction_table" in ds.attrs["env_spec"] and ds.attrs["instructions"] == [PUSH, PUSH]


def test_mt10_without_the_one_hot_task_id_lists_every_instruction():
    env = envs.make_env("mt10", task_onehot=False)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (39,) and len(env.instructions) == 10 and "open the drawer" in env.instructions
    assert envs.make_env_from_spec(env.spec_dict()).reset(seed=0)[0].shape == (39,)


@pytest.mark.skipif(not instructions.encoder_installed(), reason="the sentence encoder is an optional extra (.[lang])")
def test_minilm_places_open_and_close_the_drawer_close_together():
    t = InstructionTable.build(["open the drawer", "close the drawer", "press the button from the top"])
    sim = t.embeddings @ t.embeddings.T
    assert t.dim == 384 and np.allclose(np.diag(sim), 1.0, atol=1e-5)
    assert 0.89 < sim[0, 1] < 0.92 and sim[0, 2] < sim[0, 1]  # 0.905, as issue 25 reports
