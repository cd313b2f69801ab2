"""LoRA through peft, and the shared-base mode of `rto ppo --lora-r N`.

Full RTO holds five networks: policy, reference, DPO model, reward model and critic, the
trained ones with optimizer state. In the shared-base mode one frozen copy of the SFT model
serves four of them: the policy and the critic are LoRA adapters on it (the critic adds a
value head), the DPO model is the adapter `rto dpo --lora-r N` trained on the same base, and
the reference is the base with every adapter switched off. Only the reward model, usually
smaller, stays a model of its own.

The critic starts from the reward model, as a full critic does: its value head is the RM's
score head, and when the RM is itself a LoRA adapter on this same base (a SEQ_CLS adapter of
peft), the critic's adapter starts as the RM's adapter - then the critic's value at the last
token equals the RM's score exactly. With a full-model RM only the head carries over, reading
the base's features through a new (zero-effect) adapter: the RM's fine-tuned features cannot be
expressed by a fresh adapter. Without an RM (dpo-only) the head starts at zero.

`AdapterView` makes one adapter look like a model to the trainer: calling it, `generate`,
and `parameters()` (its own adapter weights only, for its optimizer and gradient clipping).
Only one adapter is active at a time, so the trainer must finish a backward pass before it
calls another view - which PPO's policy-then-critic order does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from rto.io.errors import UserError
from rto.lm.models import peft_quietly, score_parts
from rto.lm.scoring import keeps_logits


def lora_config(r: int, alpha: float, target: list[str] | str, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, bias="none", task_type=task_type)


def merged_state_dict(
    peft_model, adapter: str, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The base model's weights with one adapter's update added, under the base's own names,
    computed without touching the shared base (merging in place and back would drift it).
    `state`: the base model's full state dict (peft's LoRA names inside) when its modules hold only
    shards (rto.runtime.sharding); the update is then peft's plain LoRA delta, B @ A * scaling, computed here."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if state is None:
                w = module.get_base_layer().weight
                delta = module.get_delta_weight(adapter)
            else:
                w = state[f"{name}.base_layer.weight"]
                delta = (
                    state[f"{name}.lora_B.{adapter}.weight"].float()
                    @ state[f"{name}.lora_A.{adapter}.weight"].float()
                    * module.scaling[adapter]
                )
                delta = delta.T if module.fan_in_fan_out else delta
            out[f"{name}.weight"] = (w + delta.to(w.dtype)).detach().clone()
    for key, value in (base.state_dict() if state is None else state).items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        out.setdefault(clean, value.detach().clone())
    return out


def rm_adapter_weights(path: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """A reward model saved as a peft SEQ_CLS adapter: its LoraConfig as a causal-LM adapter, and
    its LoRA tensors under peft's saved names (its score head comes with the merged RM)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(path))
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, False
    tensors = load_file(str(Path(path) / "adapter_model.safetensors"))
    return config, {k: v for k, v in tensors.items() if "lora_" in k}


def rm_value_head(rm) -> nn.Linear:
    """A trainable copy of a reward model's score head (a linear layer to one output)."""
    _, head = score_parts(rm)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise UserError(
            f"reward model: its score head is a {type(head).__name__}, not a linear layer to one "
            "output; the LoRA critic cannot start from it"
        )
    copy = nn.Linear(head.in_features, 1, bias=head.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(head.weight.float())
        if head.bias is not None:
            copy.bias.copy_(head.bias.float())
    return copy


class SharedBase:
    """One frozen base (the SFT model) with adapters `policy`, `critic` and optionally `dpo`.

    `critic_adapter`: a reward model saved as an adapter on this base, whose adapter the critic's
    starts from; `value_head`: the critic's head (an `nn.Linear` to 1 output; default: zeros)."""

    def __init__(
        self,
        base,
        r: int,
        alpha: float,
        target: list[str] | str,
        dpo_adapter: str | None = None,
        critic_adapter: str | None = None,
        value_head: nn.Linear | None = None,
    ):
        from peft import get_peft_model

        base.requires_grad_(False)
        config = lora_config(r, alpha, target)
        with peft_quietly():
            self.model = get_peft_model(base, config, adapter_name="policy")
        rm_lora = None
        if critic_adapter is not None:
            critic_config, rm_lora = rm_adapter_weights(critic_adapter)
            self.model.add_adapter("critic", critic_config)
        else:
            self.model.add_adapter("critic", config)
        if dpo_adapter is not None:
            self.model.load_adapter(dpo_adapter, adapter_name="dpo", is_trainable=False)
        self.find_parameters()
        # Both trained adapters hold requires_grad from the start, so their optimizers see them;
        # switching adapters later toggles it, which is harmless between backward passes.
        for adapter, trainable in (("policy", True), ("critic", True), ("dpo", False)):
            for p in self.adapter_parameters(adapter):
                p.requires_grad_(trainable)
        if rm_lora is not None:
            self._load_adapter_tensors("critic", rm_lora, critic_adapter)
        hidden = base.config.get_text_config().hidden_size
        if value_head is None:
            value_head = nn.Linear(hidden, 1, bias=False)
            nn.init.zeros_(value_head.weight)
        elif value_head.in_features != hidden or value_head.out_features != 1:
            raise UserError(
                f"the reward model's score head is {value_head.in_features} -> {value_head.out_features}; "
                f"the critic needs {hidden} -> 1"
            )
        self.value_head = value_head
        self._active = "policy"
        self.model.eval()

    def find_parameters(self) -> None:
        """Each adapter's parameters, found once: the views, the optimizers, gradient clipping and
        checkpoints all read them, some every step. Moving to a device or dtype keeps these objects;
        sharding (rto.runtime.sharding.wrap) registers new ones, so it is called again after."""
        self._adapter_params = {
            a: {n: p for n, p in self.model.named_parameters() if "lora_" in n and f".{a}." in n}
            for a in ("policy", "critic", "dpo")
        }

    def _load_adapter_tensors(self, adapter: str, saved: dict[str, torch.Tensor], source) -> None:
        """Copy a saved adapter's LoRA tensors (peft's names without the adapter name) into `adapter`."""
        params = self._adapter_params[adapter]
        copied = set()
        with torch.no_grad():
            for key, value in saved.items():
                head, last = key.rsplit(".", 1)
                name = f"{head}.{adapter}.{last}"
                if name not in params or params[name].shape != value.shape:
                    raise UserError(f"{source}: adapter tensor {key} does not fit the base model")
                params[name].copy_(value)
                copied.add(name)
        if copied != set(params):
            raise UserError(f"{source}: the adapter lacks {len(set(params) - copied)} of the base's LoRA tensors")

    @contextlib.contextmanager
    def active(self, adapter: str | None):
        """Run the base with one adapter (None: with none, i.e. the reference model)."""
        if adapter is None:
            with self.model.disable_adapter():
                yield
            return
        if self._active != adapter:
            self.model.set_adapter(adapter)  # also makes only this adapter require grad
            if adapter == "dpo":
                for p in self.adapter_parameters("dpo"):
                    p.requires_grad_(False)
            self._active = adapter
        yield

    def named_adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        return dict(self._adapter_params[adapter])

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return list(self._adapter_params[adapter].values())

    def view(self, adapter: str | None) -> AdapterView:
        return AdapterView(self, adapter)

    def critic(self) -> CriticView:
        return CriticView(self)


class AdapterView(nn.Module):
    """The shared base seen through one adapter; a causal LM to its caller."""

    def __init__(self, shared: SharedBase, adapter: str | None):
        super().__init__()
        object.__setattr__(self, "shared", shared)  # not a submodule: parameters() stays this adapter's
        self.adapter = adapter

    def forward(self, **kwargs):
        with self.shared.active(self.adapter):
            return self.shared.model(**kwargs)

    def generate(self, **kwargs):
        with self.shared.active(self.adapter):
            return self.shared.model.generate(**kwargs)

    def get_base_model(self):
        return self.shared.model.get_base_model()

    @property
    def config(self):
        return self.shared.model.config

    def parameters(self, recurse: bool = True):
        return iter(self.shared.adapter_parameters(self.adapter) if self.adapter else [])

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return iter(self.shared.named_adapter_parameters(self.adapter).items() if self.adapter else [])

    def save_pretrained(self, out, **kwargs):
        """A plain checkpoint with the adapter merged in: every stage and tool reads it as is."""
        base = self.shared.model.get_base_model()
        state = merged_state_dict(self.shared.model, self.adapter) if self.adapter else None
        base.save_pretrained(out, state_dict=state, **kwargs)


class CriticView(nn.Module):
    """The critic: the base with the `critic` adapter, and a value head on its last hidden states."""

    def __init__(self, shared: SharedBase):
        super().__init__()
        object.__setattr__(self, "shared", shared)
        self.value_head = shared.value_head

    def score_parts(self):
        return self.shared.model.get_base_model().base_model, self.value_head

    def token_scores(self, **inputs) -> torch.Tensor:
        """Values at every position: [rows, L]. The hidden states are caught from one call of the
        shared model's forward (as rto.lm.scoring.token_scores does: a sharded base is gathered there);
        its LM head computes one position only where the model allows it."""
        backbone, head = self.score_parts()
        caught: list[torch.Tensor] = []
        hook = backbone.register_forward_hook(lambda module, args, output: caught.append(output.last_hidden_state))
        keep = {"logits_to_keep": 1} if keeps_logits(self.shared.model) else {}
        try:
            with self.shared.active("critic"):
                self.shared.model(**inputs, **keep)
        finally:
            hook.remove()
        return head(caught[-1]).squeeze(-1)

    def parameters(self, recurse: bool = True):
        return iter([*self.shared.adapter_parameters("critic"), *self.value_head.parameters()])
