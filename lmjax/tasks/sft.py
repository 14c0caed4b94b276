"""`train.objective: sft`: supervised fine-tuning of a decoder on chats (lmjax/data/chat.py).

The rows are causal rows of rendered conversations (lmjax/data/post_training.py) whose
`loss_mask` is 1 only on the assistant's tokens, so the loss, z-loss and bits per byte are the
causal LM's over the response tokens alone.
"""

from __future__ import annotations

from lmjax.tasks.causal_lm import CausalLMTask


class SFTTask(CausalLMTask):
    name = "sft"

    def layout(self, tokenizer):
        from lmjax.data.post_training import example_rows

        return example_rows(self.cfg, "sft")

    def build_data(self, cfg):
        from lmjax.data.post_training import build_sft_data

        return build_sft_data(cfg)

    def eval_constants(self, data):
        """The end-of-turn marker stands for no text of the response: zero bytes in bits per byte
        (its literal piece, `<|end|>`, would count 7)."""
        from lmjax.data.chat import ChatTemplate

        constants = super().eval_constants(data)
        template = ChatTemplate(self.cfg.chat, data.tokenizer)
        constants["token_bytes"][[template.end_id, *template.role_ids.values()]] = 0
        return constants
