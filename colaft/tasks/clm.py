"""Causal language modelling: question -> answer, the loss on the answer tokens only (and on
the learnt assistant turns of a conversation: every one of a chat file's, unless weight 0).
Tool calls, tool turns and tools are rendered by the chat template, or in colaft.chats' plain
form by a template that does not know tools (and without a template)."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from rouge_score import rouge_scorer
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from colaft import chats
from colaft.assets import resolve_model
from colaft.server import element_losses
from colaft.tasks.base import Recipe, eval_outputs, keeps_users, register_task, user_of, with_users

IGNORE = -100  # label of tokens outside the loss (transformers' convention)


@register_task("clm")
class CausalLM:
    """Examples are chat turns: the tokenizer's chat template when it has one, else a plain
    "Question: ... Answer: ..." prompt, so any causal LM folder works."""

    fields = ("question", "answer")
    recipe = Recipe(model="smollm2-135m", data="chatterbot", targets=["q_proj", "v_proj"],
                    lr=1e-3, batch_size=8, max_length=128, max_steps=60, metric="loss")
    rouge_examples = 8
    """Held-out examples whose greedy answer is scored with ROUGE-L."""
    max_new_tokens = 32

    def load(self, model: str, records: list[dict], seed: int) -> nn.Module:
        folder = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_pretrained(folder)

    # ------------------------------------------------------------- data
    def prompt_and_answer(self, question: str | list[dict], answer: str) -> tuple[str, str]:
        """The two texts whose concatenation is one training example.

        `question` is the user's text, or a whole conversation before the answer (chat
        messages: {"role": "system" | "user" | "assistant", "content": text})."""
        tok = self.tokenizer
        if not tok.chat_template:
            return self.plain_prompt(question), f" {answer}{tok.eos_token or ''}"
        prompt = self.prompt(question)
        user = question if isinstance(question, list) else [{"role": "user", "content": question}]
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not extend the prompt with the answer")
        return prompt, full[len(prompt):]

    def pieces(self, question: str | list[dict], answer: str | dict,
               tools: list[dict] | None = None) -> list[tuple[str, bool]]:
        """The example's text in order, in pieces each learnt (True) or not: the answer, and the
        question's assistant turns whose "weight" is 1 (chat files weigh every turn, see
        colaft.formats; any other assistant turn of a question is context).

        With a chat template, the text before each learnt turn is the conversation up to it
        rendered with the generation prompt, and the turn is what rendering it adds; one
        question and answer make `prompt_and_answer`'s two pieces. `answer`: its text, or the
        assistant message when it calls tools; `tools`: those the conversation may call."""
        if not isinstance(question, list):
            prompt, answer = self.prompt_and_answer(question, answer)
            return [(prompt, False), (answer, True)]
        final = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
        messages, extra = self.template_messages([*question, final], tools)
        learnt = [i + len(messages) - len(question) - 1 for i, m in enumerate(question)
                  if m["role"] == "assistant" and m.get("weight")] + [len(messages) - 1]
        tok, pieces, done, start = self.tokenizer, [], "", 0
        for k in learnt:
            if tok.chat_template:
                before = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True, **extra)
                through = tok.apply_chat_template(messages[:k + 1], tokenize=False, **extra)
                if not before.startswith(done) or not through.startswith(before):
                    raise ValueError("the tokenizer's chat template does not extend a conversation turn by turn")
            else:  # one "Question: ...\nAnswer: ..." block a learnt turn, its context lines first
                before = done + ("\n" if done else "") + self.plain_prompt(messages[start:k])
                through = f"{before} {messages[k]['content']}{tok.eos_token or ''}"
            pieces += [(before[len(done):], False), (through[len(before):], True)]
            done, start = through, k + 1
        return pieces

    def template_messages(self, conversation: list[dict], tools: list[dict] | None = None) -> tuple[list, dict]:
        """(messages, keywords) for the chat template: tool calls and tool turns in Hugging
        Face's form and the tools as `tools=` when the template knows tools, else in
        colaft.chats' plain form (the tools a first system turn); no "weight"."""
        tool_form = chats.knows_tools(self.tokenizer.chat_template)
        messages = chats.for_template(conversation, tool_form)
        if tools and not tool_form:
            messages.insert(0, chats.tools_turn(tools))
        return messages, {"tools": tools} if tools and tool_form else {}

    def plain_prompt(self, question: str | list[dict]) -> str:
        """The prompt of a tokenizer without a chat template: "Question: ...\nAnswer:" (earlier
        turns of a conversation first, one "Role: text" line each)."""
        if not isinstance(question, list):
            return f"Question: {question}\nAnswer:"
        if not question:  # two learnt turns in a row
            return "Answer:"
        *history, last = question
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in history]
        return "\n".join(lines + [f"Question: {last['content']}\nAnswer:"])

    def prompt(self, question: str | list[dict]) -> str:
        """The text a model continues with its answer (what `prompt_and_answer` puts first)."""
        tok = self.tokenizer
        if not tok.chat_template:
            return self.plain_prompt(question)
        if not isinstance(question, list):
            question = [{"role": "user", "content": question}]
        messages, extra = self.template_messages(question)
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)

    def encode(self, records: list[dict], max_length: int) -> list[dict]:
        features = []
        for r in records:
            question = r["question"] if isinstance(r["question"], list) else str(r["question"])
            answer = r["answer"] if isinstance(r["answer"], dict) else str(r["answer"])
            ids, labels = [], []
            # Each piece is tokenised apart so the learnt/unlearnt boundaries are exact; the
            # template's special tokens separate them, so this equals tokenising the whole text.
            for text, learnt in self.pieces(question, answer, r.get("tools")):
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
                ids += tokens
                labels += tokens if learnt else [IGNORE] * len(tokens)
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels):  # no answer token left: nothing to learn from
                continue
            features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, **user_of(r)})
        if not features:
            raise ValueError(f"max_length {max_length} leaves no answer token in any example")
        return features

    @keeps_users
    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        # Pads input_ids with the pad token and labels with IGNORE, so padding has no loss.
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE, return_tensors="pt")(features)

    # ------------------------------------------------------------- metrics
    def evaluate(self, cola_model: nn.Module, batches: Iterable[dict]) -> dict:
        """Loss per answer token and perplexity (also per user); ROUGE-L over all users only,
        as greedy generation costs far more than the loss."""
        batches = list(batches)
        loss_sums, tokens, users = [], [], []  # per row: summed token losses, tokens
        for batch, out in eval_outputs(cola_model, batches):
            losses, weights = element_losses(cola_model.model, out, batch)  # (B, T): the shifted loss's terms
            loss_sums += (losses * weights).sum(1).tolist()
            tokens += weights.sum(1).tolist()
            users += batch.get("users", [])

        def scores(rows: list[int]) -> dict[str, float]:
            loss = sum(loss_sums[i] for i in rows) / sum(tokens[i] for i in rows)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        metrics = scores(list(range(len(tokens)))) | {"rougeL": self.rouge(cola_model, batches)}
        return with_users(metrics, scores, users)

    def rouge(self, cola_model: nn.Module, batches: list[dict]) -> float:
        """Mean ROUGE-L F1 of greedy answers against the references, on `rouge_examples`
        examples spread evenly over the held-out batches (not only the shortest ones)."""
        rows = [(ids, labels, b["users"][i] if "users" in b else None)
                for b in batches for i, (ids, labels) in enumerate(zip(b["input_ids"], b["labels"]))]
        prompts, references, users = [], [], []
        for ids, labels, user in rows[::max(1, len(rows) // self.rouge_examples)][:self.rouge_examples]:
            learnt = (labels != IGNORE).tolist()
            end = len(learnt) - learnt[::-1].index(True)  # the last learnt turn ends here
            answer_at = end - learnt[:end][::-1].index(False) if False in learnt[:end] else 0
            prompts.append(ids[:answer_at].tolist())  # the prompt is everything before it
            references.append(self.tokenizer.decode(labels[answer_at:end], skip_special_tokens=True))
            users.append(user)
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        answers = self.generate(cola_model, prompts, users=None if None in users else users)
        return sum(scorer.score(r, a)["rougeL"].fmeasure for r, a in zip(references, answers)) / len(answers)

    def prompt_ids(self, questions: list[str | list[dict]]) -> list[list[int]]:
        """Token ids of the prompts a model answers (`prompt`), as `encode` makes them."""
        return [self.tokenizer(self.prompt(q), add_special_tokens=False)["input_ids"] for q in questions]

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[list[int]], users: list[str] | None = None,
                 max_new_tokens: int | None = None, **options) -> list[str]:
        """Answers to token-id prompts, in one batch, through the adapters (of `users[i]` for row i).

        Greedy unless `options` (transformers' generation options, e.g. do_sample=True,
        temperature=0.7) say otherwise. `model`: a ColaModel, or a plain causal LM (no `users`).
        """
        model.eval()
        # Left padding keeps every prompt's last token at the end, where generation continues.
        batch = self.tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
        routed = {} if users is None else {"users": users}
        out = model.generate(**batch, **routed, **({"do_sample": False} | options),
                             max_new_tokens=max_new_tokens or self.max_new_tokens,
                             pad_token_id=self.tokenizer.pad_token_id)  # (B, T + new)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
