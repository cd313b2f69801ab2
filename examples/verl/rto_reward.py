"""RTO's dense token reward inside verl 0.9.1: a reward-loop manager whose scores are per token.

What it computes, for each response token t (rto.core.rewards, the same functions `rto ppo` uses):

    r_t = clip(beta1 * (log pi_dpo(y_t) - log pi_ref(y_t)), -dpo_clip, dpo_clip) + [t == last] * rm_weight * score

and verl adds the KL penalty per token itself (`algorithm.use_kl_in_reward=True`:
`apply_kl_penalty`, verl/trainer/ppo/ray_trainer.py:78-117, token_level_rewards = scores - beta * KL).

Where verl 0.9.1 lets a reward be dense, and where it does not (file:line in verl 0.9.1):
  - A reward-loop manager's `run_single` returns one `reward_score` per response. On the *colocated*
    reward path verl gathers those and calls the manager class's own `assemble_rm_scores(data, scores)`
    (experimental/reward_loop/reward_loop.py:361-363), a classmethod (reward_manager/base.py:61-82)
    this class overrides: its `reward_score` is the response's list of token rewards, and
    `assemble_rm_scores` lays them out as `rm_scores` [B, R]. Both trainers then use `rm_scores` as
    `token_level_scores` unchanged (v1: trainer/ppo/v1/trainer_base.py:1566-1572 keeps every token,
    1750; legacy v0: ray_trainer.py:1563-1567 and extract_reward, trainer/ppo/reward.py:160-167).
  - The colocated path runs only with `reward.reward_model.enable=True` and
    `reward.reward_model.enable_resource_pool=False` (reward_loop.py:320-322; v1 trainer_base.py:577,
    ray_trainer.py:949), and reaches the manager's `run_single` only when
    `reward.custom_reward_function.path` is set (reward_loop.py:146-155; otherwise verl asks the RM
    itself and the manager is skipped). So the command below serves the RM with verl's reward-model
    server and names this file's `rm_score` as the custom function, which asks that server.
  - NOT dense: the streaming path (no reward model, or its own resource pool): the agent loop keeps
    `reward_score: Optional[float]` and puts it on the last token (experimental/agent_loop/agent_loop.py:103,
    144-148). This manager refuses to start there rather than fail mid-run.
  - NOT dense: advantage estimators that sum a response's token rewards first (GRPO, RLOO, ...);
    use `algorithm.adv_estimator=gae` (PPO with a critic, RTO's setting).
  - verl computes the reward before the old and reference log-probs (v1 trainer_base.py:576-591;
    ray_trainer.py:1561-1622), so `ref_log_prob` is not in the batch yet; the v1 trainer hands the
    reward only prompts, responses, attention mask and raw prompt (trainer_base.py:1533-1561), and
    verl's one other frozen model, the distillation teacher, feeds a distillation loss, not the
    reward (trainer/distillation/losses.py). So this manager computes log pi_dpo and log pi_ref
    itself, with transformers, per response, in each reward-loop worker: Ray actors that ask for no
    GPU (reward_loop.py:308, 333-341), so on CPU unless `device` names a GPU they can see. Each of the
    reward.num_workers workers (default 8) loads both models. Fine for small models; for large ones
    this is the bottleneck, and the place verl 0.9.1 gives no better hook.

Settings come in through verl's config, `reward.reward_kwargs` (read from the config the manager
is built with, as verl's DAPO manager reads its own, reward_manager/dapo.py:33-35):
  dpo_model (required), ref_model (default: actor_rollout_ref.model.path, the SFT model, DPO's
  reference), beta1 (0.05), dpo_clip (0.05; null = no clip), rm_weight (1.0), score_clip (10.0;
  null = none), kind ("rto"; or another rto.core placement: sparse, dpo-only, ddpo, rs - not semi,
  which needs segment ends), device ("cpu").

verl finds the class by file path (reward.reward_manager.source=importlib,
trainer/ppo/reward.py:89-108); importing the file also registers it as "rto" in verl's reward-loop
registry (experimental/reward_loop/reward_manager/registry.py:24-38), for code that imports it first.

The command. rto-rlhf must be importable in verl's environment (`pip install --no-deps -e $RTO`:
rto.core needs only torch); $RTO is the checkout's absolute path (verl's Ray workers load the file
by path); the SFT, DPO and RM models share the SFT tokenizer; the RM is a sequence classifier vLLM
serves (/classify); data in verl's parquet format (a `prompt` chat per row):

# BEGIN VERL COMMAND
python -m verl.trainer.main_ppo \
    data.train_files=$DATA/train.parquet data.val_files=$DATA/test.parquet \
    actor_rollout_ref.model.path=$SFT critic.model.path=$SFT \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 critic.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
    algorithm.adv_estimator=gae \
    algorithm.use_kl_in_reward=True algorithm.kl_penalty=kl algorithm.kl_ctrl.kl_coef=0.05 \
    actor_rollout_ref.actor.use_kl_loss=False \
    reward.reward_model.enable=True reward.reward_model.enable_resource_pool=False \
    reward.reward_model.model_path=$RM reward.reward_model.rollout.name=vllm \
    reward.reward_model.rollout.tensor_model_parallel_size=1 \
    reward.custom_reward_function.path=$RTO/examples/verl/rto_reward.py \
    reward.custom_reward_function.name=rm_score \
    reward.reward_manager.source=importlib reward.reward_manager.name=RTORewardManager \
    reward.reward_manager.module.path=$RTO/examples/verl/rto_reward.py \
    +reward.reward_kwargs.dpo_model=$DPO +reward.reward_kwargs.beta1=0.05 +reward.reward_kwargs.dpo_clip=0.05
# END VERL COMMAND

Checked by integrations/verl/check against the installed verl 0.9.1, on CPU: this command composes
with verl's own ppo_trainer.yaml and passes main_ppo's validate_config; verl's loader finds the
class and its registry the name; RewardLoopManager.compute_rm_score, with RewardLoopWorkers
in-process and as real Ray actors, runs it on verl DataProtos in both trainers' layouts, `rm_score`
asking a stand-in of the RM server over HTTP; the [B, R] scores equal rto.core's, computed
independently; verl's apply_kl_penalty and GAE then run on them. Not run there (they need GPUs or
a full cluster): the vLLM reward-model server itself, rollout, the FSDP actor/critic/ref workers,
TransferQueue, and the trainer's fit() loop.

The reward math (the functions before the class) needs only torch and rto.core; the manager needs verl.
"""

from __future__ import annotations

import inspect

import torch

from rto.core.rewards import PLACEMENTS, dpo_token_term, token_rewards

try:
    from verl.experimental.reward_loop.reward_manager import registry as _verl_registry
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
except ImportError:  # the reward math works without verl (tests/test_verl_example.py); the manager does not
    _verl_registry, RewardManagerBase = None, object

NAME = "rto"  # the name in verl's reward-loop registry
DEFAULTS = dict(
    dpo_model=None, ref_model=None, beta1=0.05, dpo_clip=0.05, rm_weight=1.0, score_clip=10.0, kind="rto", device="cpu"
)


# ----------------------------------------------------------------- the reward math (torch + rto.core)


def sample_tokens(prompts: torch.Tensor, responses: torch.Tensor, attention_mask: torch.Tensor):
    """One sample's prompt and response token ids, padding dropped. verl lays a sample out as
    [prompt | response] with one attention mask over both; the prompt is left-padded in the rollout's
    batch (legacy trainer) and right-padded in the v1 trainer's reward input, the response
    right-padded: so take the tokens where the mask is 1, wherever the padding lies."""
    P = prompts.shape[-1]
    mask = attention_mask.bool()
    return prompts[mask[:P]], responses[mask[P:]]


@torch.no_grad()
def response_token_logprobs(model, prompt_ids: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """log p(response token | everything before it) under `model`, one float per response token.
    Unpadded, one sample: no attention mask or position ids to get wrong."""
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, response_ids]).to(device).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, prompt_ids.numel() - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, response_ids.to(device).unsqueeze(-1)).squeeze(-1).cpu()


def rto_token_rewards(
    dpo_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    score: float,
    *,
    beta1: float,
    dpo_clip: float | None,
    rm_weight: float = 1.0,
    score_clip: float | None = None,
    kind: str = "rto",
) -> tuple[torch.Tensor, dict]:
    """One response's token rewards without the KL penalty (verl adds it), via rto.core; and what
    to log: the summed DPO term, the fraction of tokens whose DPO term the clip cut."""
    mask = torch.ones(1, dpo_logp.numel(), dtype=torch.long)
    dense, clipped = dpo_token_term(dpo_logp.float()[None], ref_logp.float()[None], mask, beta1, dpo_clip)
    s = torch.tensor([float(score)])
    if score_clip is not None:
        s = s.clamp(-score_clip, score_clip)
    rewards = token_rewards(
        kind, mask=mask, kl=torch.zeros_like(dense), kl_coef=0.0, score=s, dpo_term=dense, rm_weight=rm_weight
    )
    return rewards[0], {"dpo_term_sum": float(dense.sum()), "dpo_clip_frac": float(clipped)}


def place_token_rewards(
    prompts: torch.Tensor, responses: torch.Tensor, attention_mask: torch.Tensor, rewards: list
) -> torch.Tensor:
    """[B, R] rm_scores: row i's token rewards on its response tokens (in order), 0 on padding."""
    out = torch.zeros(responses.shape, dtype=torch.float32)
    response_mask = attention_mask[:, prompts.shape[-1] :].bool()
    for i, r in enumerate(rewards):
        r = torch.as_tensor(r, dtype=torch.float32).reshape(-1)
        n = int(response_mask[i].sum())
        if r.numel() != n:
            raise ValueError(
                f"rto reward: sample {i} has {n} response tokens but {r.numel()} token rewards; "
                "was this manager's run_single (a list per response) used?"
            )
        out[i, response_mask[i]] = r
    return out


# ----------------------------------------------------------------- the verl reward-loop manager


def _load_causal_lm(path: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def reward_settings(config) -> dict:
    """The manager's settings: DEFAULTS updated from verl's `reward.reward_kwargs`."""
    given = config.reward.get("reward_kwargs", None) or {}
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"rto reward: unknown reward.reward_kwargs {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **{k: given[k] for k in given}}
    if not settings["dpo_model"]:
        raise ValueError("rto reward: set +reward.reward_kwargs.dpo_model=<the DPO model's directory>")
    if settings["kind"] not in PLACEMENTS or settings["kind"] == "semi":
        raise ValueError(f"rto reward: kind must be one of {sorted(set(PLACEMENTS) - {'semi'})}")
    settings["ref_model"] = settings["ref_model"] or config.actor_rollout_ref.model.path
    return settings


def check_dense_path(config) -> None:
    """Refuse the configurations in which verl would drop or reject the per-token reward."""
    rm = config.reward.reward_model
    if not rm.enable or rm.enable_resource_pool:
        raise ValueError(
            "rto reward: verl keeps a per-token reward only on its colocated reward path; set "
            "reward.reward_model.enable=True reward.reward_model.enable_resource_pool=False "
            "(otherwise the agent loop keeps one float per response)"
        )
    if not config.reward.custom_reward_function.get("path"):
        raise ValueError(
            "rto reward: set reward.custom_reward_function.path (this file) and .name=rm_score: "
            "without it verl scores with the RM alone and never calls this manager"
        )


class RTORewardManager(RewardManagerBase):
    """verl 0.9.1 reward-loop manager: `run_single` returns one response's token rewards,
    `assemble_rm_scores` lays them out as the [B, R] `rm_scores` verl trains on."""

    def __init__(self, config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None):
        if _verl_registry is None:
            raise ImportError("RTORewardManager runs inside verl: pip install verl==0.9.1")
        super().__init__(config, tokenizer, compute_score)
        check_dense_path(config)
        self.settings = reward_settings(config)
        self.reward_router_address = reward_router_address
        self.reward_model_tokenizer = reward_model_tokenizer
        device = self.settings["device"]
        # Loaded once per reward-loop worker (one manager per worker process).
        self.dpo_model = _load_causal_lm(self.settings["dpo_model"], device)
        self.ref_model = _load_causal_lm(self.settings["ref_model"], device)

    async def _sentence_score(self, data_item, response_ids: torch.Tensor, prompt_ids: torch.Tensor) -> float:
        """The response's score from the configured score function (rm_score: verl's RM server)."""
        non_tensor = data_item.non_tensor_batch
        raw_prompt = non_tensor.get("raw_prompt", None)
        extra_info = dict(non_tensor.get("extra_info", None) or {})
        extra_info.update(
            raw_prompt=None if raw_prompt is None else list(raw_prompt),
            prompt_str=self.tokenizer.decode(prompt_ids, skip_special_tokens=True),
            rm_model=self.config.reward.reward_model.model_path,
            rm_engine=self.config.reward.reward_model.rollout.name,
        )
        reward_model = non_tensor.get("reward_model", None) or {}
        kwargs = dict(
            data_source=non_tensor.get("data_source", None),
            solution_str=self.tokenizer.decode(response_ids, skip_special_tokens=True),
            ground_truth=reward_model.get("ground_truth", None),
            extra_info=extra_info,
        )
        if self.reward_router_address is not None:  # as verl's own managers pass them
            kwargs.update(
                reward_router_address=self.reward_router_address, reward_model_tokenizer=self.reward_model_tokenizer
            )
        result = self.compute_score(**kwargs)
        if inspect.isawaitable(result):
            result = await result
        return float(result["score"] if isinstance(result, dict) else result)

    async def run_single(self, data) -> dict:
        item = data[-1]  # verl passes one sample (a 1-row DataProto); multi-sequence outputs: the last
        prompt_ids, response_ids = sample_tokens(
            item.batch["prompts"], item.batch["responses"], item.batch["attention_mask"]
        )
        score = await self._sentence_score(item, response_ids, prompt_ids)
        if response_ids.numel() == 0:  # nothing generated: no token to pay
            return {
                "reward_score": [],
                "reward_extra_info": {"rm_score": score, "dpo_term_sum": 0.0, "dpo_clip_frac": 0.0},
            }

        def token_rewards_of_sample():
            dpo = response_token_logprobs(self.dpo_model, prompt_ids, response_ids)
            ref = response_token_logprobs(self.ref_model, prompt_ids, response_ids)
            s = self.settings
            return rto_token_rewards(
                dpo,
                ref,
                score,
                beta1=s["beta1"],
                dpo_clip=s["dpo_clip"],
                rm_weight=s["rm_weight"],
                score_clip=s["score_clip"],
                kind=s["kind"],
            )

        # The forward passes block: off the event loop, so other samples' RM requests go on meanwhile.
        rewards, info = await self.loop.run_in_executor(None, token_rewards_of_sample)
        return {"reward_score": rewards.tolist(), "reward_extra_info": {"rm_score": score, **info}}

    @classmethod
    def assemble_rm_scores(cls, data, scores: list) -> torch.Tensor:
        b = data.batch
        return place_token_rewards(b["prompts"], b["responses"], b["attention_mask"], scores)


async def rm_score(
    data_source=None,
    solution_str="",
    ground_truth=None,
    extra_info=None,
    reward_router_address=None,
    reward_model_tokenizer=None,
    **_,
) -> float:
    """The RM's score of one response, from the reward-model server verl starts
    (`reward.reward_model.enable=True`): the prompt's chat plus the response, rendered with the RM's
    chat template, posted to the router as verl's own RM path posts it (reward_loop.py:197-249)."""
    import aiohttp

    if reward_router_address is None:
        raise ValueError("rm_score needs verl's reward-model server: reward.reward_model.enable=True")
    info = extra_info or {}
    chat = info.get("raw_prompt")
    if chat is not None and getattr(reward_model_tokenizer, "chat_template", None):
        chat = [dict(m) for m in chat] + [{"role": "assistant", "content": solution_str}]
        text = reward_model_tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
        bos = reward_model_tokenizer.bos_token
        if bos and text.startswith(bos):  # the server's tokenizer adds BOS itself
            text = text[len(bos) :]
    else:
        text = info.get("prompt_str", "") + solution_str
    engine, model = info.get("rm_engine"), info.get("rm_model")
    if engine == "vllm":
        endpoint, payload = "classify", {"model": model, "input": text, "use_activation": False}
    elif engine == "sglang":
        endpoint, payload = "v1/embeddings", {"model": model, "input": text}
    else:
        raise ValueError(f"rm_score: unsupported reward-model engine {engine!r} (vllm or sglang)")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{reward_router_address}/{endpoint}", json=payload) as resp:
            resp.raise_for_status()
            out = await resp.json()
    last = out["data"][-1]
    return float(last["probs"][-1] if engine == "vllm" else last["embedding"][-1])


# verl loads this file by path (source=importlib) more than once per process (once for the manager,
# once for rm_score), each load a new class: register the first, and do not refuse the next.
if _verl_registry is not None and NAME not in _verl_registry.REWARD_MANAGER:
    _verl_registry.register(NAME)(RTORewardManager)
