"""BERT and RoBERTa encoders (also XLM-RoBERTa and CamemBERT, which use RoBERTa's names).

For BERT: ``bert.embeddings.*`` -> begin as ``embeddings.*``; ``bert.encoder.layer.N.rest`` ->
layer N as ``rest`` (a ``BertLayer``'s state dict); ``bert.pooler.*`` -> end as ``pooler.*``; the
heads ``cls.*`` (pre-training / masked LM), ``classifier.*`` and ``qa_outputs.*`` -> end unchanged.
RoBERTa is the same with ``roberta.`` for ``bert.`` and ``lm_head.*`` for ``cls.*``. Checkpoints
saved from ``BertModel``/``RobertaModel`` (no ``bert.``/``roberta.`` prefix) give the same parts.
The ``embeddings.position_ids``/``token_type_ids`` buffers older checkpoints hold are kept in begin
and named in :attr:`Family.buffers` (the model rebuilds them).
A masked-LM head ties its decoder to the word embeddings: when a checkpoint has the head
(``cls.predictions.*``, ``lm_head.*``) but not its decoder, end gets ``...decoder.weight`` from the
embeddings and ``...decoder.bias`` from the head's ``bias``, as the model shares them.
"""

from __future__ import annotations

import re

from ._family import Family, prefix_decider, register

__all__ = ["bert_decider", "bert_family", "family", "roberta_decider", "roberta_family"]

bert_decider = prefix_decider(
    begin=("bert.embeddings.",),
    layers="bert.encoder.layer",
    end=("bert.pooler.", "cls.", "classifier.", "qa_outputs."),
    base="bert.",
)

roberta_decider = prefix_decider(
    begin=("roberta.embeddings.",),
    layers="roberta.encoder.layer",
    end=("roberta.pooler.", "lm_head.", "classifier.", "qa_outputs."),
    base="roberta.",
)

bert_family = register(
    Family(
        name="bert",
        decider=bert_decider,
        model_types=("bert",),
        architectures=("BertForMaskedLM", "BertForPreTraining", "BertModel"),
        layers="bert.encoder.layer",
        base="bert.",
        embed_key="bert.embeddings.word_embeddings.weight",
        head_key="cls.predictions.decoder.weight",
        head_with="cls.predictions.",
        aliases=(("cls.predictions.decoder.bias", "cls.predictions.bias"),),
        ties_by_default=True,
        signature=re.compile(r"^(?:bert\.)?encoder\.layer\.\d+\.attention\.self\."),
    )
)

roberta_family = register(
    Family(
        name="roberta",
        decider=roberta_decider,
        model_types=("roberta", "xlm-roberta", "camembert"),
        architectures=("RobertaForMaskedLM", "RobertaModel", "XLMRobertaForMaskedLM", "XLMRobertaModel"),
        layers="roberta.encoder.layer",
        base="roberta.",
        embed_key="roberta.embeddings.word_embeddings.weight",
        head_key="lm_head.decoder.weight",
        head_with="lm_head.",
        aliases=(("lm_head.decoder.bias", "lm_head.bias"),),
        ties_by_default=True,
        signature=re.compile(r"^roberta\.encoder\.layer\.\d+\.attention\.self\."),
    )
)

#: This module's main family, as in the other modules.
family = bert_family
