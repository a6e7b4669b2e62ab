"""The model card of a trained model and its upload to the Hub."""

import dataclasses
import os
import re


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ what }} trained with `progressive-denoising` on `{{ dataset }}` for {{ steps }} steps.
{{ extra }}
## Metrics

{{ metrics }}
{{ samples }}
## Training options

| option | value |
|---|---|
{{ options }}
"""


def model_card(title, options, metrics, dataset, steps, extra="", sample_image=None, license="apache-2.0",
               what="A Progressive Denoising Model (PDM)", unused_options=()):
    """README.md text: `what` was trained on what, for how long, and how well, under the Hub's metadata; the options
    table leaves out `unused_options` (a fine-tuned model's sizes, which come from its base) and unset ones.

    huggingface_hub renders the card (`ModelCard.from_template`) and diffusers adds the tags (`populate_model_card`,
    as diffusers' training scripts do). The metadata names the `license` of the weights, the data set (`datasets`)
    and the model trained from (`base_model`: `options.model_name_or_path`, else `options.text_encoder`) where they
    are Hub ids: the Hub links those entries to repositories, so a local folder is named in the text only.
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    def hub_id(name):
        if isinstance(name, str) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
            return name
        return None

    base_model = hub_id(getattr(options, "model_name_or_path", None)) or hub_id(getattr(options, "text_encoder", None))
    card_data = ModelCardData(library_name="progressive-denoising", pipeline_tag="text-to-image", license=license,
                              datasets=[hub_id(dataset)] if hub_id(dataset) else None, base_model=base_model)
    card = ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, title=title, what=what, dataset=dataset, steps=steps, extra=extra,
        metrics="\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items())
        or "- none recorded",
        samples=f"\n## Samples\n\n![samples]({sample_image})\n" if sample_image else "",
        options="\n".join(f"| `{k}` | `{v}` |" for k, v in dataclasses.asdict(options).items()
                          if v is not None and k not in unused_options),
    )
    return str(populate_model_card(card, tags=["progressive-denoising", "pdm", "text-to-image"]))


def push_folder(folder, hub_model_id, message):
    """Create the Hub repository if needed and upload `folder` to it."""
    from huggingface_hub import create_repo, upload_folder

    if not hub_model_id:
        raise ValueError("option 'hub_model_id' is required with push_to_hub")
    repo_id = create_repo(hub_model_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    return repo_id
