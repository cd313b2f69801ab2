"""What test_rto_verl.py needs besides verl: tiny models built in-process (nothing is downloaded),
a stand-in for verl's reward-model server, and RTO's reward computed independently of the example."""

from __future__ import annotations

import asyncio
import threading

import torch

WORDS = [f"w{i}" for i in range(40)]
# A chat template for the word-level vocabulary (roles are words too), so the RM's input is text
# the tokenizer can read back.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "user", "assistant", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    out.chat_template = CHAT_TEMPLATE
    return out


def make_models(root) -> dict:
    """{"sft", "dpo", "rm"}: a random tiny Llama (the SFT policy, DPO's reference), a perturbed copy
    (the DPO policy), and the RM's directory (its tokenizer: verl's worker loads it)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    sft = LlamaForCausalLM(cfg)
    paths = {k: str(root / k) for k in ("sft", "dpo", "rm")}
    sft.save_pretrained(paths["sft"])
    tok.save_pretrained(paths["sft"])
    with torch.no_grad():
        for p in sft.parameters():  # large enough that the DPO term is visibly nonzero, and some clip
            p.add_(0.3 * torch.randn_like(p))
    sft.save_pretrained(paths["dpo"])
    tok.save_pretrained(paths["dpo"])
    LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1})).save_pretrained(paths["rm"])
    tok.save_pretrained(paths["rm"])
    return paths


def fake_rm_score(text: str) -> float:
    """The stand-in RM's score: any deterministic function of the text it was sent."""
    return sum(int(w[1:]) for w in text.split() if w.startswith("w")) / 10.0 - 3.0


class FakeRMServer:
    """Answers POST /classify as vLLM's pooling server does for verl's reward loop
    ({"data": [{"probs": [score]}]}), on 127.0.0.1, in a thread; records the texts it scored."""

    def __init__(self):
        from aiohttp import web

        self.texts: list[str] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def classify(request):
            body = await request.json()
            self.texts.append(body["input"])
            assert body.get("use_activation") is False and body.get("model")
            return web.json_response({"data": [{"probs": [fake_rm_score(body["input"])]}]})

        async def start():
            app = web.Application()
            app.router.add_post("/classify", classify)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.address = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
            ready.set()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(30)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@torch.no_grad()
def batch_logprobs(model_dir, prompts, prompt_mask, responses, response_mask) -> torch.Tensor:
    """[B, R] log-probs of the response tokens, one padded batch (prompts left-padded, responses
    right-padded), attention mask and position ids as a trainer passes them; 0 on padding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, attn = torch.cat([prompts, responses], 1), torch.cat([prompt_mask, response_mask], 1)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits
    R = responses.shape[1]
    logp = torch.log_softmax(logits[:, -R - 1 : -1].float(), -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    return logp * response_mask


def reference_rewards(models, samples, pad_id, scores, beta1, dpo_clip, score_clip):
    """RTO's [B, R] reward from rto.core, on batched log-probs: (rewards, response mask, DPO term)."""
    from rto.core.rewards import dpo_token_term, token_rewards

    P, R = max(len(s["prompt"]) for s in samples), max(len(s["response"]) for s in samples) + 1
    prompts, pm = torch.full((len(samples), P), pad_id), torch.zeros((len(samples), P), dtype=torch.long)
    responses, rm = torch.full((len(samples), R), pad_id), torch.zeros((len(samples), R), dtype=torch.long)
    for i, s in enumerate(samples):
        prompts[i, P - len(s["prompt"]) :], pm[i, P - len(s["prompt"]) :] = s["prompt"], 1
        responses[i, : len(s["response"])], rm[i, : len(s["response"])] = s["response"], 1
    dpo = batch_logprobs(models["dpo"], prompts, pm, responses, rm)
    ref = batch_logprobs(models["sft"], prompts, pm, responses, rm)
    dense, _ = dpo_token_term(dpo, ref, rm, beta1, dpo_clip)
    score = scores.clamp(-score_clip, score_clip) if score_clip is not None else scores
    rewards = token_rewards("rto", mask=rm, kl=torch.zeros_like(dense), kl_coef=0.0, score=score, dpo_term=dense)
    return rewards, rm, dense
