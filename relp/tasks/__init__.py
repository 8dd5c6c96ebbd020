"""Tasks: clean/corrupted prompt datasets for patching (the IOI generator, prompt files)::

    from relp.tasks import make_ioi_dataset
    data = make_ioi_dataset(model, 64, corruption="abc", seed=0)
    for batch in data.batches():
        batch.clean_tokens, batch.corrupted_tokens                 # [batch, pos]
        batch.answer_tokens, batch.wrong_tokens, batch.positions   # [batch], {name: [batch]}

See :mod:`relp.tasks.dataset` for batching prompts of different lengths and combining per-position
scores across batches, :mod:`relp.tasks.ioi` for the IOI templates and corruptions,
:mod:`relp.tasks.contrast` for anchor/clean/corrupted sentence triples for embedding models, and
:mod:`relp.tasks.prompts` for the file format.
"""

from relp.tasks.contrast import (
    CONTRAST_CHANGES,
    CONTRAST_POSITION_NAMES,
    CONTRAST_TEMPLATES,
    ContrastDataset,
    ContrastExample,
    ContrastTemplate,
    contrast_words,
    make_contrast_dataset,
)
from relp.tasks.dataset import (
    BOS_LABEL,
    OTHER_LABEL,
    PositionScores,
    PromptDataset,
    PromptExample,
    aggregate_by_position,
)
from relp.tasks.ioi import (
    ABBA_LONG_TEMPLATES,
    ABBA_TEMPLATES,
    BABA_LONG_TEMPLATES,
    BABA_TEMPLATES,
    CORRUPTIONS,
    NAMES,
    OBJECTS,
    PLACES,
    POSITION_NAMES,
    TEMPLATE_SETS,
    TEMPLATES,
    Corruption,
    IOIVocabulary,
    Template,
    ioi_vocabulary,
    ioi_words,
    make_ioi_dataset,
    mirror_template,
    resolve_templates,
    single_token_words,
)
from relp.tasks.prompts import PromptFileError, load_prompts, prompts_from_records, save_prompts
from relp.tokens import TaskTokenizer

__all__ = [
    "ABBA_LONG_TEMPLATES",
    "ABBA_TEMPLATES",
    "BABA_LONG_TEMPLATES",
    "BABA_TEMPLATES",
    "BOS_LABEL",
    "CONTRAST_CHANGES",
    "CONTRAST_POSITION_NAMES",
    "CONTRAST_TEMPLATES",
    "CORRUPTIONS",
    "NAMES",
    "OBJECTS",
    "OTHER_LABEL",
    "PLACES",
    "POSITION_NAMES",
    "TEMPLATES",
    "TEMPLATE_SETS",
    "ContrastDataset",
    "ContrastExample",
    "ContrastTemplate",
    "Corruption",
    "IOIVocabulary",
    "PositionScores",
    "PromptDataset",
    "PromptExample",
    "PromptFileError",
    "TaskTokenizer",
    "Template",
    "aggregate_by_position",
    "contrast_words",
    "ioi_vocabulary",
    "ioi_words",
    "load_prompts",
    "make_contrast_dataset",
    "make_ioi_dataset",
    "mirror_template",
    "prompts_from_records",
    "resolve_templates",
    "save_prompts",
    "single_token_words",
]
