"""The language-model loss, computed only where there is something to learn.

A causal LM predicts token ``p + 1`` from position ``p``. Training masks the prompt (labels -100),
so most positions of a chat record, and every padding position, have nothing to predict; running
the LM head there (a hidden-size × vocabulary product per position, then a float32 softmax over
the whole vocabulary) is work nobody reads. ``labelled_forward`` gathers the final hidden states
at the positions whose next label is set, before the head (a forward pre-hook on the model's
output embedding, so peft, accelerate and DDP wrappers see an ordinary forward), and
``next_token_loss`` reproduces transformers' ``ForCausalLMLoss`` on them: float32
cross-entropy, summed and divided by ``num_items_in_batch`` when the Trainer gives it (gradient
accumulation), the mean otherwise. Padded and packed batches alike.
"""

from __future__ import annotations

IGNORE_INDEX = -100


def output_head(model):
    """The module that turns hidden states into logits (``lm_head``), through peft/DDP wrappers."""
    return getattr(model, "module", model).get_output_embeddings()


def next_token_loss(logits, targets, num_items_in_batch=None):
    """Cross-entropy of ``logits`` (tokens, vocab) against ``targets`` (tokens), in float32."""
    import torch

    logits = logits.float()
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    total = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def labelled_forward(model, inputs: dict, num_items_in_batch=None):
    """(loss, outputs) of ``model`` on ``inputs`` (which hold ``labels``), the LM head run only at the
    labelled positions: ``outputs.logits`` is (labelled tokens, vocab), in batch order."""
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    wanted = labels[:, 1:] != IGNORE_INDEX  # position p predicts label p + 1

    def gather(module, args):
        return (args[0][:, :-1][wanted],) + tuple(args[1:])

    handle = output_head(model).register_forward_pre_hook(gather)
    try:
        outputs = model(**inputs, logits_to_keep=0)
    finally:
        handle.remove()
    outputs.loss = next_token_loss(outputs.logits, labels[:, 1:][wanted], num_items_in_batch)
    return outputs.loss, outputs


def answer_loss_sums(model, inputs: dict) -> tuple[float, int]:
    """(summed loss, number of labelled tokens) of one batch, without gradients: for a mean over many."""
    import torch

    with torch.inference_mode():
        loss, outputs = labelled_forward(model, inputs, num_items_in_batch=torch.tensor(1.0))
        return loss.item(), int(outputs.logits.shape[0])
