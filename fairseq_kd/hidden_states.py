"""The hidden states of fairseq transformer translation models that distillation compares."""

import torch


def decoder_final_states(model, extra) -> torch.Tensor:
    """The decoder's last hidden state, (B, T, C): the input of its output projection.

    Rebuilt from the forward pass's ``extra["inner_states"]`` (the last layer's output, T x B x C)
    with the decoder's final layer norm (pre-norm models) applied, as fairseq's
    ``TransformerDecoder.extract_features`` does, so no second forward pass is needed. An output
    dimension projection (``project_out_dim``) is not applied: the states compared are the
    decoder's own width.
    """
    decoder = model.decoder
    if "inner_states" not in extra:
        raise ValueError(
            f"{decoder.__class__.__name__} does not return inner_states; the cosine term needs a "
            "fairseq transformer decoder"
        )
    states = extra["inner_states"][-1].transpose(0, 1)
    layer_norm = getattr(decoder, "layer_norm", None)
    return layer_norm(states) if layer_norm is not None else states


def state_widths(model) -> dict:
    """``{"encoder": C_enc, "decoder": C_dec}``: the widths of a transformer's final states (None
    for a side that is not a fairseq transformer)."""
    embed_tokens = getattr(model.encoder, "embed_tokens", None)
    return {
        "encoder": getattr(embed_tokens, "embedding_dim", None),
        "decoder": getattr(model.decoder, "embed_dim", None),
    }
