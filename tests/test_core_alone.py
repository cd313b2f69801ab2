"""`rto.core` needs nothing but torch: a verl or OpenRLHF user can take RTO's dense reward alone
(`pip install --no-deps rto-rlhf`) without transformers, TRL or the rest of this package's stack."""

import subprocess
import sys

# (numpy stays: torch itself imports it.)
BLOCKED = (
    "transformers",
    "trl",
    "accelerate",
    "peft",
    "datasets",
    "safetensors",
    "yaml",
    "tqdm",
    "matplotlib",
    "pandas",
    "tokenizers",
    "huggingface_hub",
)

SCRIPT = f"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked in this test: {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
import torch
import rto.core.advantages, rto.core.kl_control, rto.core.losses, rto.core.masked, rto.core.rewards
import rto.core.selection
from rto.core.rewards import dpo_token_term, kl_estimate, token_rewards
from rto.core.advantages import gae, whiten

# A left-padded batch of two responses, as another trainer holds it.
mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
logp, ref, dpo = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
dense, _ = dpo_token_term(dpo, ref, mask, beta1=0.05, clip=None)
r = token_rewards("rto", mask=mask, kl=kl_estimate(logp, ref) * mask, kl_coef=0.01, score=torch.tensor([1.0, 2.0]),
                  dpo_term=dense)
adv, ret = gae(r, torch.zeros(2, 4), mask)
assert r.shape == (2, 4) and torch.isfinite(whiten(adv, mask)).all()
loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
print("ok", loaded)
"""


def test_without_the_training_stack_the_command_says_what_to_install():
    blocker = SCRIPT.split("import torch")[0]
    code = blocker + "from rto.cli import main\nraise SystemExit(main(['sft', '--help']))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("rto: error: the commands need the training stack")
    assert "pip install 'rto-rlhf[train]'" in proc.stderr


def test_rto_core_imports_and_runs_with_torch_alone():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok []"
