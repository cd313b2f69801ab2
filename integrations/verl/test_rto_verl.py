"""examples/verl/rto_reward.py inside the real verl 0.9.1 (run by integrations/verl/check, in its venv).

What runs here is verl's own code: its Hydra config (ppo_trainer.yaml) composed with the example's
command, verl's config checks, its loader (resolve_reward_manager_cls / load_reward_manager), its
reward-loop registry, its RewardLoopWorker (which builds the manager and calls run_single per
sample), RewardLoopManager.compute_rm_score (chunking, padding, the manager's assemble_rm_scores),
DataProto, apply_kl_penalty and compute_advantage (GAE). The reward must equal rto.core's, computed
here independently: batched, padded forward passes of the same tiny models.
compute_rm_score's workers run in-process (fast, every layout and setting) and once as real Ray
actors. Not run: the vLLM reward-model server (a stand-in answers its /classify route over HTTP),
rollout, the actor/critic/ref workers, TransferQueue, fit().
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "verl" / "rto_reward.py"

from rto_verl_support import FakeRMServer, fake_rm_score, make_models, reference_rewards  # noqa: E402


def command_overrides(paths: dict, extra: tuple = ()) -> list[str]:
    """The overrides of the command in the example's docstring (what docs/usage.md shows), with the
    $VARIABLES filled in."""
    text = re.search(r"# BEGIN VERL COMMAND\n(.*?)# END VERL COMMAND", EXAMPLE.read_text(), re.S).group(1)
    words = _command_after(text, "python -m verl.trainer.main_ppo")
    assert words[:3] == ["python", "-m", "verl.trainer.main_ppo"], words[:3]
    return [re.sub(r"\$(\w+)", lambda m: paths[m.group(1)], w) for w in words[3:]] + list(extra)


def _command_after(text: str, start: str) -> list[str]:
    """The shell words of the command that begins at `start` and goes on over backslash-newlines."""
    lines = text[text.index(start) :].splitlines()
    end = next(i for i, line in enumerate(lines) if not line.rstrip().endswith("\\"))
    return shlex.split(" ".join(line.rstrip().rstrip("\\") for line in lines[: end + 1]))


def test_the_docs_show_the_tested_command():
    page = (ROOT / "docs" / "usage.md").read_text()
    if "verl.trainer.main_ppo" not in page:
        pytest.skip("docs/usage.md shows no verl command yet")
    example = EXAMPLE.read_text()
    start = "python -m verl.trainer.main_ppo"
    assert _command_after(page, start) == _command_after(example, start), (
        "docs/usage.md's verl command is not the tested one"
    )


def compose(overrides: list[str]):
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def paths(models, tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    return dict(DATA=str(data), SFT=models["sft"], RM=models["rm"], DPO=models["dpo"], RTO=str(ROOT))


@pytest.fixture(scope="module")
def rm_server():
    server = FakeRMServer()
    yield server
    server.close()


def test_the_command_composes_with_verls_config_and_passes_its_checks(paths):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy, need_reward_model
    from verl.utils.config import validate_config

    cfg = compose(command_overrides(paths))
    # main_ppo.main's own check of the composed config (verl/trainer/main_ppo.py:177)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    assert need_critic(cfg) and need_reference_policy(cfg) and need_reward_model(cfg)
    assert cfg.algorithm.adv_estimator == "gae" and cfg.algorithm.use_kl_in_reward
    assert cfg.trainer.use_v1  # the default trainer; the legacy one reaches the manager the same way
    rm = cfg.reward.reward_model
    assert rm.enable and not rm.enable_resource_pool  # verl's colocated reward path: the only dense one
    assert cfg.reward.reward_kwargs.dpo_model == paths["DPO"]


def test_verl_loads_and_registers_the_manager(paths):
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    cfg = compose(command_overrides(paths))
    cls = resolve_reward_manager_cls(cfg)  # what RewardLoopManager does (reward_loop.py:309)
    assert cls.__name__ == "RTORewardManager" and issubclass(cls, RewardManagerBase)
    # Loading the file the way verl loads it registers the manager in the reward-loop registry,
    # where verl 0.9.1 looks names up (not verl.workers.reward_manager's, which it no longer reads).
    assert get_reward_manager_cls("rto").__name__ == "RTORewardManager"
    assert "assemble_rm_scores" in vars(cls), "without its own assemble_rm_scores verl keeps one score per response"


def _layouts(tokenizer, seed: int = 0):
    """Three samples in the two layouts verl hands a reward manager: the v1 trainer's reward input
    (trainer/ppo/v1/trainer_base.py:1533-1561: prompts right-padded) and the legacy trainer's batch
    (prompts left-padded, with input_ids, position_ids, data_source...). Returns the unpadded
    samples too."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in tokenizer.get_vocab() if w.startswith("w")]
    samples = []
    for n_prompt, n_resp, ends_eos in [(3, 5, True), (6, 2, False), (1, 7, True)]:
        prompt = " ".join(words[int(i)] for i in torch.randint(len(words), (n_prompt,), generator=g))
        p_ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        r_ids = torch.tensor(
            [tokenizer.convert_tokens_to_ids(words[int(i)]) for i in torch.randint(len(words), (n_resp,), generator=g)]
        )
        if ends_eos:
            r_ids[-1] = tokenizer.eos_token_id
        samples.append(dict(chat=[{"role": "user", "content": prompt}], prompt=p_ids, response=r_ids))
    P, R = max(len(s["prompt"]) for s in samples), max(len(s["response"]) for s in samples) + 1
    pad = tokenizer.pad_token_id

    def padded(seqs, width, left):
        out, mask = torch.full((len(seqs), width), pad), torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            out[i, sl], mask[i, sl] = s, 1
        return out, mask

    responses, response_mask = padded([s["response"] for s in samples], R, left=False)
    raw_prompt = np.empty(len(samples), dtype=object)
    raw_prompt[:] = [s["chat"] for s in samples]
    out = {}
    for name, left in (("v1", False), ("legacy", True)):
        prompts, prompt_mask = padded([s["prompt"] for s in samples], P, left=left)
        attention_mask = torch.cat([prompt_mask, response_mask], 1)
        data = {"prompts": prompts, "responses": responses, "attention_mask": attention_mask, "raw_prompt": raw_prompt}
        if name == "legacy":
            data.update(
                input_ids=torch.cat([prompts, responses], 1),
                response_mask=response_mask,
                position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
                data_source=np.array(["rto"] * len(samples), dtype=object),
                reward_model=np.array([{"ground_truth": None}] * len(samples), dtype=object),
            )
        out[name] = data
    return out, samples


def _rm_texts(models, tokenizer, samples) -> list[str]:
    """What the RM must be asked: each prompt's chat and its response, in the RM's chat template."""
    from transformers import AutoTokenizer

    rm_tok = AutoTokenizer.from_pretrained(models["rm"])
    return [
        rm_tok.apply_chat_template(
            s["chat"] + [{"role": "assistant", "content": tokenizer.decode(s["response"], skip_special_tokens=True)}],
            tokenize=False,
        )
        for s in samples
    ]


class _InProcessHandle:
    """Stands in for a Ray actor handle of a RewardLoopWorker: .compute_score_batch.remote(chunk)
    runs the worker's own coroutine on its own event loop, here."""

    def __init__(self, worker):
        self.worker = worker
        self.compute_score_batch = self

    def remote(self, chunk):
        return self.worker.loop.run_until_complete(self.worker.compute_score_batch(chunk))


def _verl_rm_scores(cfg, data, rm_server, monkeypatch, n_workers=2):
    """verl's RewardLoopManager.compute_rm_score over `n_workers` real RewardLoopWorkers, with the
    Ray calls made in-process."""
    from verl.experimental.reward_loop import reward_loop
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    manager = reward_loop.RewardLoopManager.__new__(reward_loop.RewardLoopManager)  # its __init__ starts Ray
    manager.config, manager.reward_model_manager = cfg, None
    manager.reward_router_address = rm_server.address
    manager.reward_manager_cls = resolve_reward_manager_cls(cfg)
    manager.reward_loop_workers = [
        _InProcessHandle(reward_loop.RewardLoopWorker(cfg, rm_server.address)) for _ in range(n_workers)
    ]
    monkeypatch.setattr(reward_loop.ray, "get", lambda refs: list(refs))
    return manager.compute_rm_score(data)


@pytest.mark.parametrize("layout", ["v1", "legacy"])
@pytest.mark.parametrize(
    "settings",
    [(), ("+reward.reward_kwargs.beta1=0.5", "+reward.reward_kwargs.dpo_clip=null")],
    ids=["command", "beta1=0.5,no-clip"],
)
def test_verls_reward_loop_gives_rto_core_dense_reward(paths, models, rm_server, monkeypatch, layout, settings):
    from transformers import AutoTokenizer
    from verl import DataProto

    overrides = command_overrides(paths)
    for s in settings:  # the same key given twice: Hydra refuses, so replace the command's own
        overrides = [o for o in overrides if o.split("=")[0] != s.split("=")[0]] + [s]
    cfg = compose(overrides)
    tokenizer = AutoTokenizer.from_pretrained(models["sft"])
    batches, samples = _layouts(tokenizer)
    data = DataProto.from_single_dict(batches[layout])

    rm_server.texts.clear()
    out = _verl_rm_scores(cfg, data, rm_server, monkeypatch)
    rm_scores = out.batch["rm_scores"]

    kw = cfg.reward.reward_kwargs
    beta1, dpo_clip = float(kw.beta1), (None if kw.dpo_clip is None else float(kw.dpo_clip))
    texts = _rm_texts(models, tokenizer, samples)
    # (verl pads the 3 samples to 4 for its 2 workers, pad_dataproto_to_divisor: one is asked twice)
    assert set(rm_server.texts) == set(texts) and len(rm_server.texts) == 4
    scores = torch.tensor([fake_rm_score(t) for t in texts])
    expected, response_mask, dense = reference_rewards(
        models, samples, tokenizer.pad_token_id, scores, beta1, dpo_clip, score_clip=10.0
    )

    torch.testing.assert_close(rm_scores, expected, atol=1e-5, rtol=1e-5)
    assert (rm_scores[response_mask == 0] == 0).all()
    # Dense: a reward on every response token, not only the last (a DPO term that is 0 would prove nothing).
    assert (dense[response_mask.bool()] != 0).all()
    assert ((rm_scores != 0).sum(-1) == response_mask.sum(-1)).all()
    if dpo_clip is not None:
        assert dense.abs().max() <= dpo_clip + 1e-6
    # verl's reward extra info (logged per sample) comes back through compute_rm_score.
    assert set(out.meta_info["reward_extra_keys"]) == {"rm_score", "dpo_term_sum", "dpo_clip_frac"}
    np.testing.assert_allclose(out.non_tensor_batch["rm_score"].astype(float), scores.numpy(), rtol=1e-6)


def test_verls_reward_loop_manager_on_ray_workers(paths, models, rm_server):
    """The same through real Ray actors: RewardLoopWorkers in their own processes load the example
    by path (rto.core must import there), and verl moves their outputs back through Ray."""
    import ray
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.experimental.reward_loop import reward_loop
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    cfg = compose(command_overrides(paths, extra=("reward.num_workers=2",)))
    tokenizer = AutoTokenizer.from_pretrained(models["sft"])
    batches, samples = _layouts(tokenizer)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        # RewardLoopManager.__init__ minus the vLLM reward-model server it would start (reward_loop.py:279-310)
        manager = reward_loop.RewardLoopManager.__new__(reward_loop.RewardLoopManager)
        manager.config, manager.reward_model_manager = cfg, None
        manager.reward_router_address = rm_server.address
        manager.reward_loop_workers_class = ray.remote(reward_loop.RewardLoopWorker)
        manager.reward_manager_cls = resolve_reward_manager_cls(cfg)
        manager._init_reward_loop_workers()
        rm_scores = manager.compute_rm_score(DataProto.from_single_dict(batches["v1"])).batch["rm_scores"]
    finally:
        ray.shutdown()
    scores = torch.tensor([fake_rm_score(t) for t in _rm_texts(models, tokenizer, samples)])
    expected, _, _ = reference_rewards(models, samples, tokenizer.pad_token_id, scores, 0.05, 0.05, score_clip=10.0)
    torch.testing.assert_close(rm_scores, expected, atol=1e-5, rtol=1e-5)


def test_verls_kl_penalty_and_gae_run_on_the_dense_reward(paths, models, rm_server, monkeypatch):
    """The trainer's next steps after the reward (v1 trainer_base.py:1743-1786), verl's own functions."""
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    from rto.core.advantages import gae

    cfg = compose(command_overrides(paths))
    batches, _ = _layouts(AutoTokenizer.from_pretrained(models["sft"]))
    data = DataProto.from_single_dict(batches["legacy"])
    rm_scores = _verl_rm_scores(cfg, data, rm_server, monkeypatch).batch["rm_scores"]
    mask = data.batch["response_mask"]
    g = torch.Generator().manual_seed(3)
    old, ref, values = (torch.randn(mask.shape, generator=g) for _ in range(3))
    batch = DataProto.from_dict(
        {
            "response_mask": mask,
            "token_level_scores": rm_scores,
            "old_log_probs": old,
            "ref_log_prob": ref,
            "values": values,
        },
        non_tensors={"uid": np.array([str(i) for i in range(len(mask))], dtype=object)},
    )
    batch, _ = apply_kl_penalty(
        batch, kl_ctrl=core_algos.get_kl_controller(cfg.algorithm.kl_ctrl), kl_penalty=cfg.algorithm.kl_penalty
    )
    kl_coef = float(cfg.algorithm.kl_ctrl.kl_coef)
    rewards = rm_scores - kl_coef * (old - ref) * mask  # RTO's full reward: DPO term + RM score - KL
    torch.testing.assert_close(batch.batch["token_level_rewards"], rewards)
    # As the v1 trainer calls it (trainer_base.py:1775); for GAE it hands over to ray_trainer.compute_advantage.
    batch = compute_advantage_for_multi_trajectories(
        batch,
        batch_keys=[f"{i}_0_0" for i in range(len(mask))],
        adv_estimator=cfg.algorithm.adv_estimator,
        gamma=cfg.algorithm.gamma,
        lam=cfg.algorithm.lam,
        num_repeat=cfg.actor_rollout_ref.rollout.n,
        norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo,
        config=cfg.algorithm,
    )
    _, returns = gae(rewards, values, mask, gamma=float(cfg.algorithm.gamma), lam=float(cfg.algorithm.lam))
    torch.testing.assert_close(batch.batch["returns"] * mask, returns, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        (("reward.reward_model.enable=False",), "colocated reward path"),
        (("reward.reward_model.enable_resource_pool=True",), "colocated reward path"),
        (("reward.custom_reward_function.path=null",), "custom_reward_function"),
        (("~reward.reward_kwargs.dpo_model",), "dpo_model"),
        (("+reward.reward_kwargs.beta=0.1",), "unknown reward.reward_kwargs"),
    ],
)
def test_refuses_settings_that_would_lose_the_dense_reward(paths, rm_server, change, message):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    keys = {c.lstrip("~+").split("=")[0] for c in change}
    overrides = [o for o in command_overrides(paths) if o.lstrip("+").split("=")[0] not in keys]
    overrides += [c for c in change if not c.startswith("~")]
    with pytest.raises(ValueError, match=message):
        RewardLoopWorker(compose(overrides), rm_server.address)
