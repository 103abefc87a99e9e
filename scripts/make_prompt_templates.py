"""Write the ImageNet prompt templates under data/prompts/ from open_clip's 80 CLIP templates.

imagenet_plain.txt: the templates with {name}; imagenet_cpa.txt: the same templates with the
class name followed by its context, "{name}, a type of {context}" (context-based prompt
augmentation). Run once; the output is committed:  python scripts/make_prompt_templates.py
"""

from pathlib import Path

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

OUT = Path(__file__).resolve().parent.parent / "data" / "prompts"
MARK = "\x00"


def main() -> None:
    plain = [template(MARK).replace(MARK, "{name}") for template in OPENAI_IMAGENET_TEMPLATES]
    cpa = [t.replace("{name}", "{name}, a type of {context}") for t in plain]
    source = "from open_clip, written by scripts/make_prompt_templates.py"
    (OUT / "imagenet_plain.txt").write_text(
        f"# The 80 CLIP ImageNet templates ({source})\n" + "\n".join(plain) + "\n")
    (OUT / "imagenet_cpa.txt").write_text(
        f"# The 80 CLIP ImageNet templates with CPA context ({source})\n" + "\n".join(cpa) + "\n")


if __name__ == "__main__":
    main()
