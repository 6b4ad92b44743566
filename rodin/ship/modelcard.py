"""The model card of a release (its README.md on the Hub), generated from the run directory, in
English then in French, as RODIN-1B's.

Frozen decisions:
- Every figure comes from the run: the checkpoint's meta and config (shape, steps, tokens seen),
  metrics.jsonl (hardware, device-hours summed over the logged intervals, held-out loss), the
  shards' source index and mixture manifest with data/sources.json (sources, and each licence as
  the source's own card states it), and eval/ (scores, learning curves, needle grid).
- A chat fine-tune (sft.py records the checkpoint it started from) is an instruct model: chat
  usage and the base it came from; a pretraining run is a base model: completion usage.
- What the run does not hold is said ("not recorded"), never made up.
"""

import glob
import json
import os

from rodin.io import figure, save_figure
from rodin.ship.hf import architecture
from rodin.train import checkpoint
from rodin.train.runlog import read_run

REGISTRY = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "sources.json")
MISSING = {"en": "not recorded", "fr": "non enregistré"}


# ---- facts of a run ---------------------------------------------------------------------------------

def eval_scores(runs):
    """{(task, metric): {run name: value}} from each run's newest eval, and {run name: its label}."""
    newest = {run["name"]: run["evals"][-1] for run in runs if run["evals"]}
    cells = {}
    for name, (label, results) in newest.items():
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in key and key not in ("sample_len",):
                    cells.setdefault((task, key.split(",")[0]), {})[name] = value
    return cells, {name: label for name, (label, _) in newest.items()}


def plot_evals(cells, names, path):
    """Grouped bars: one group per task (its acc_norm, else acc, else first metric), one bar per run."""
    primary = {}
    for task, metric in sorted(cells):
        rank = {"acc_norm": 0, "acc": 1}.get(metric, 2)
        if task not in primary or rank < primary[task][0]:
            primary[task] = (rank, metric)
    tasks = list(primary)
    fig, ax = figure(max(5, 1.2 * len(tasks) * len(names)), 4)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [cells[(t, primary[t][1])].get(name, 0.0) for t in tasks]
        ax.bar([k + i * width for k in range(len(tasks))], values, width, label=name, color=f"C{i}")
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n{primary[t][1]}" for t in tasks], fontsize=8)
    ax.set_ylabel("score")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return save_figure(fig, path)



def read_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compute_hours(records):
    """{"W x DEVICE": hours} of training: each logged interval lasted its tokens / its tokens_per_s
    (evaluation pauses excluded), times the processes that ran it."""
    hours, previous = {}, None
    for r in records:
        if r.get("tokens_per_s") and previous is not None and r.get("tokens_seen", 0) > previous:
            world = r.get("world_size", 1)
            kind = f"{world} x {r.get('device', 'unrecorded hardware')}"
            hours[kind] = hours.get(kind, 0.0) + (r["tokens_seen"] - previous) / r["tokens_per_s"] / 3600 * world
        if "tokens_seen" in r:
            previous = r["tokens_seen"]
    return hours


def last(records, key):
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def data_sources(data_dir):
    """{"manifest": path or None, "sources": {name: {"tokens", "share"}}} of the token shards in
    data_dir (their .idx.json name each range's source; encode_state.json names a mixture manifest),
    or None when data_dir is not there."""
    if not data_dir or not os.path.isdir(data_dir):
        return None
    sources = {}
    for path in sorted(glob.glob(os.path.join(data_dir, "train-*.idx.json"))):
        for start, end, name in read_json(path)["ranges"]:
            sources.setdefault(name, {"tokens": 0, "share": None})["tokens"] += end - start
    inputs = (read_json(os.path.join(data_dir, "encode_state.json"), {}) or {}).get("inputs") or []
    manifest_path = inputs[0][0] if len(inputs) == 1 and inputs[0][0].endswith(".json") else None
    manifest = read_json(manifest_path) if manifest_path else None
    for name, info in ((manifest or {}).get("sources") or {}).items():
        sources.setdefault(name, {"tokens": None, "share": None})["share"] = info.get("share")
    total = sum(s["tokens"] or 0 for s in sources.values())
    for s in sources.values():
        if s["share"] is None and s["tokens"] and total:
            s["share"] = s["tokens"] / total
    return {"manifest": manifest_path if manifest else None, "sources": sources}


def describe_source(name, registry):
    """(Hub id or file, licence as the source's card states it) from data/sources.json."""
    if name in registry.get("sources", {}):
        spec = registry["sources"][name]
        return spec.get("hub") or ", ".join(spec.get("local", [])), spec["licence"]
    if name in registry.get("files", {}):
        return f"data/{name} (shipped)", registry["files"][name]["licence"]
    return None, None


def eval_facts(run_dir):
    """The newest lm-eval results, the learning-curve and needle PNGs of run_dir/eval/."""
    eval_dir = os.path.join(run_dir, "eval")
    evals = read_run(run_dir)["evals"] if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
    needles = sorted(glob.glob(os.path.join(eval_dir, "needle-step-*.json")))
    needle = read_json(needles[-1]) if needles else None
    return {"newest": evals[-1] if evals else None,
            "curves": sorted(glob.glob(os.path.join(eval_dir, "curve-*.png"))),
            "needle": needle, "needle_png": needles[-1][: -len(".json")] + ".png" if needles else None}


def gather(run_dir, ckpt, meta, model, *, name, repo_id, dtype, quants, license, verification, revisions,
           with_optimizer, base_model=None):
    """Everything the card says, as one dict (see render)."""
    config = meta["config"]
    records = read_records(run_dir)
    instruct = checkpoint.is_sft(meta)
    facts = {"name": name, "repo_id": repo_id, "instruct": instruct, "license": license, "dtype": dtype,
             "quants": list(quants), "verification": verification, "revisions": revisions,
             "with_optimizer": with_optimizer, "base_model": base_model,
             "architecture": architecture(model.cfg, model.num_params(), dtype), "params": model.num_params(),
             "context": model.cfg.max_seq_len, "step": meta["step"], "tokens_seen": meta.get("tokens_seen"),
             "seq_len": config.get("seq_len"), "world_size": meta.get("world_size", 1),
             "batch": config["micro_batch_size"] * config["grad_accum_steps"] * meta.get("world_size", 1),
             "optimizer": config.get("optimizer", "adamw"), "lr": config["lr"], "schedule": config["schedule"],
             "hours": compute_hours(records), "val_loss": last(records, "val_loss"), "val_bpb": last(records, "val_bpb"),
             "evals": eval_facts(run_dir), "registry": read_json(REGISTRY, {}),
             "loss_png": os.path.exists(os.path.join(run_dir, "loss.png"))}
    if instruct:
        base_ckpt = meta["init_from"]
        base_run = os.path.dirname(os.path.dirname(os.path.normpath(base_ckpt)))
        base_config = read_json(os.path.join(base_run, "config.json"), {}) or {}
        facts.update(sft_data=config.get("data"), base_run=os.path.basename(base_run),
                     data=data_sources(base_config.get("data_dir")))
    else:
        facts["data"] = data_sources(config.get("data_dir"))
    return facts


# ---- the card ---------------------------------------------------------------------------------------

TEXT = {
    "en": {
        "heading": "English",
        "base": "**{name}** is a French base language model of {params} parameters, pretrained from scratch with "
                "rodin (pure PyTorch) on {tokens} tokens. It continues a text; it was not tuned to follow instructions.",
        "instruct": "**{name}** is a French instruct (chat) model of {params} parameters: the base model `{base}` "
                    "fine-tuned with rodin (pure PyTorch) on the conversations of `{sft_data}`, to answer in the ChatML "
                    "template (`<|im_start|>` / `<|im_end|>`) that `tokenizer_config.json` and the GGUFs carry.",
        "model": "Model", "training": "Training", "data": "Data", "evaluation": "Evaluation", "files": "Files",
        "usage": "Usage", "limitations": "Limitations", "revisions": "Intermediate checkpoints",
        "steps": "steps", "tokens": "tokens seen", "train_context": "training context", "batch": "batch",
        "batch_value": "{batch} sequences of {seq_len} tokens", "optimizer": "optimizer", "schedule": "learning rate",
        "schedule_value": "{lr:g}, {schedule} schedule", "compute": "compute", "hours_value": "{time} on {kind}",
        "val_loss": "held-out loss", "val_bpb": "held-out bits per byte",
        "data_intro": "Training data by source, with each licence as the source's own card states it "
                      "(`data/sources.json`):",
        "data_intro_instruct": "Fine-tuning data: `{sft_data}`. Pretraining data of the base model `{base}`, by "
                               "source, with each licence as the source's own card states it (`data/sources.json`):",
        "data_missing": "The data manifest of this run was not available when this card was made.",
        "data_header": "| source | Hub / file | licence | share | tokens |",
        "eval_intro": "lm-evaluation-harness on checkpoint {label}:",
        "eval_header": "| task | metric | score | ± |",
        "no_eval": "No benchmark was run for this release (`rodin eval runs/NAME`).",
        "curves": "Learning curves: the scores of the kept checkpoints against the tokens they had seen.",
        "needle": "Long context (needle in a haystack, {mode}, step {step}): the share of hidden numbers retrieved "
                  "by depth and context length.",
        "files_header": "| file | format | verified against |",
        "hf_row": "transformers `LlamaForCausalLM`, {dtype}, no remote code",
        "gguf_row": "GGUF {quant} for llama.cpp and Ollama",
        "modelfile_row": "Ollama Modelfile (chat template, stop token, context)",
        "verified": "argmax agreement {argmax:.1%}, max |logit diff| {diff:.2g}",
        "revisions_intro": "The kept checkpoints are revisions of this repository, named as Lucie-7B's{optimizer}:",
        "with_optimizer": ", each with its optimizer state (`optimizer.safetensors`, `trainer_state.json`)",
        "limits_base": "A small research model: it can be wrong, biased or offensive, and it knows only what its "
                       "data holds. It is not an assistant; it continues text. Context: {context} tokens.",
        "limits_instruct": "A small research model: its answers can be wrong, biased or offensive; check them. It was "
                           "tuned on a narrow set of conversations and follows the ChatML template only. "
                           "Context: {context} tokens.",
        "prompt": "La Fontaine écrivit",
        "question": "Que veut dire « ardu » ?",
    },
    "fr": {
        "heading": "Français",
        "base": "**{name}** est un modèle de langue de base pour le français, de {params} paramètres, préentraîné "
                "de zéro avec rodin (PyTorch pur) sur {tokens} tokens. Il continue un texte ; il n'a pas été affiné "
                "pour suivre des instructions.",
        "instruct": "**{name}** est un modèle instruct (conversationnel) pour le français, de {params} paramètres : "
                    "le modèle de base `{base}` affiné avec rodin (PyTorch pur) sur les conversations de `{sft_data}`, "
                    "pour répondre dans le format ChatML (`<|im_start|>` / `<|im_end|>`) que portent "
                    "`tokenizer_config.json` et les GGUF.",
        "model": "Modèle", "training": "Entraînement", "data": "Données", "evaluation": "Évaluation",
        "files": "Fichiers", "usage": "Utilisation", "limitations": "Limites", "revisions": "Points de contrôle intermédiaires",
        "steps": "étapes", "tokens": "tokens vus", "train_context": "contexte d'entraînement", "batch": "lot",
        "batch_value": "{batch} séquences de {seq_len} tokens", "optimizer": "optimiseur", "schedule": "taux d'apprentissage",
        "schedule_value": "{lr:g}, programme {schedule}", "compute": "calcul", "hours_value": "{time} sur {kind}",
        "val_loss": "perte sur les données réservées", "val_bpb": "bits par octet sur les données réservées",
        "data_intro": "Données d'entraînement par source, avec la licence qu'indique la fiche de chaque source "
                      "(`data/sources.json`) :",
        "data_intro_instruct": "Données d'affinage : `{sft_data}`. Données de préentraînement du modèle de base "
                               "`{base}`, par source, avec la licence qu'indique la fiche de chaque source "
                               "(`data/sources.json`) :",
        "data_missing": "Le manifeste des données de ce run n'était pas disponible à la rédaction de cette fiche.",
        "data_header": "| source | Hub / fichier | licence | part | tokens |",
        "eval_intro": "lm-evaluation-harness sur le point de contrôle {label} :",
        "eval_header": "| tâche | mesure | score | ± |",
        "no_eval": "Aucun banc d'essai n'a été lancé pour cette version (`rodin eval runs/NOM`).",
        "curves": "Courbes d'apprentissage : les scores des points de contrôle conservés selon les tokens vus.",
        "needle": "Contexte long (aiguille dans une botte de foin, {mode}, étape {step}) : la part des nombres cachés "
                  "retrouvés selon la profondeur et la longueur du contexte.",
        "files_header": "| fichier | format | vérifié avec |",
        "hf_row": "transformers `LlamaForCausalLM`, {dtype}, sans code distant",
        "gguf_row": "GGUF {quant} pour llama.cpp et Ollama",
        "modelfile_row": "Modelfile d'Ollama (format de conversation, jeton d'arrêt, contexte)",
        "verified": "accord des argmax {argmax:.1%}, écart max des logits {diff:.2g}",
        "revisions_intro": "Les points de contrôle conservés sont des révisions de ce dépôt, nommées comme celles de "
                           "Lucie-7B{optimizer} :",
        "with_optimizer": ", chacune avec l'état de son optimiseur (`optimizer.safetensors`, `trainer_state.json`)",
        "limits_base": "Un petit modèle de recherche : il peut se tromper, être biaisé ou offensant, et ne sait que ce "
                       "que contiennent ses données. Ce n'est pas un assistant ; il continue un texte. Contexte : "
                       "{context} tokens.",
        "limits_instruct": "Un petit modèle de recherche : ses réponses peuvent être fausses, biaisées ou offensantes ; "
                           "vérifiez-les. Il a été affiné sur un ensemble étroit de conversations et ne suit que le "
                           "format ChatML. Contexte : {context} tokens.",
        "prompt": "La Fontaine écrivit",
        "question": "Que veut dire « ardu » ?",
    },
}
FR_VALUES = {"yes": "oui", "no": "non"}
FR_LABELS = {"parameters": "paramètres", "layers": "couches", "hidden size": "dimension cachée",
             "feed-forward (SwiGLU)": "feed-forward (SwiGLU)", "vocabulary": "vocabulaire", "context": "contexte",
             "tied embeddings": "embeddings liés", "weights": "poids"}


def front_matter(facts):
    """The Hub's YAML header: licence, language, library, tags, datasets, base model."""
    datasets = sorted({facts["registry"].get("sources", {}).get(n, {}).get("hub")
                       for n in ((facts["data"] or {}).get("sources") or {})} - {None})
    if facts["instruct"] and facts.get("sft_data") and "/" in facts["sft_data"] and not os.path.exists(facts["sft_data"]):
        datasets.append(facts["sft_data"])  # a Hub dataset, not a local file
    lines = ["---", f"license: {facts['license']}", "language:", "- fr", "library_name: transformers",
             "pipeline_tag: text-generation", "tags:", "- llama", "- rodin", "- gguf"]
    lines += ["- conversational"] if facts["instruct"] else []
    lines += ["datasets:"] + [f"- {d}" for d in datasets] if datasets else []
    lines += [f"base_model: {facts['base_model']}"] if facts["base_model"] else []
    return "\n".join(lines + ["---"])


def localize(value, lang):
    text = str(value)
    if lang != "fr":
        return text
    return FR_VALUES.get(text, text.replace("KV heads", "têtes KV").replace("heads", "têtes"))


def number(n, lang):
    """1,238,415,360 in English, 1 238 415 360 (narrow no-break spaces) in French."""
    return f"{n:,}".replace(",", "\u202f") if lang == "fr" else f"{n:,}"


def duration(hours):
    if hours >= 10:
        return f"{hours:,.0f} h"
    if hours >= 0.1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 0.1 else f"{hours * 3600:.1f} s"


def table(rows):
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def training_rows(facts, t, lang):
    rows = [(t["steps"], number(facts["step"], lang)),
            (t["tokens"], number(facts["tokens_seen"], lang) if facts["tokens_seen"] is not None else MISSING[lang]),
            (t["train_context"], facts["seq_len"]),
            (t["batch"], t["batch_value"].format(**facts)),
            (t["optimizer"], facts["optimizer"]),
            (t["schedule"], t["schedule_value"].format(**facts))]
    hours = "; ".join(t["hours_value"].format(time=duration(h), kind=k) for k, h in facts["hours"].items()) or MISSING[lang]
    rows.append((t["compute"], hours))
    for key in ("val_loss", "val_bpb"):
        if facts[key] is not None:
            rows.append((t[key], f"{facts[key]:.3f}"))
    return rows


def data_section(facts, t, lang):
    intro = t["data_intro_instruct"].format(sft_data=facts.get("sft_data"), base=facts.get("base_run")) \
        if facts["instruct"] else t["data_intro"]
    if not facts["data"] or not facts["data"]["sources"]:
        return [intro, "", t["data_missing"]]
    rows = [t["data_header"], "|---|---|---|---:|---:|"]
    for name, info in sorted(facts["data"]["sources"].items()):
        hub, licence = describe_source(name, facts["registry"])
        share = f"{info['share']:.1%}" if info["share"] is not None else "–"
        tokens = number(info["tokens"], lang) if info["tokens"] is not None else "–"
        rows.append(f"| {name} | {hub or MISSING[lang]} | {licence or MISSING[lang]} | {share} | {tokens} |")
    return [intro, ""] + rows


def eval_section(facts, t):
    evals = facts["evals"]
    lines = []
    if evals["newest"]:
        label, results = evals["newest"]
        lines += [t["eval_intro"].format(label=label), "", t["eval_header"], "|---|---|---:|---:|"]
        for task, metrics in sorted(results["results"].items()):
            for key, value in sorted(metrics.items()):
                metric, _, filt = key.partition(",")
                if isinstance(value, (int, float)) and "stderr" not in metric and metric not in ("alias", "sample_len"):
                    stderr = metrics.get(f"{metric}_stderr,{filt}")
                    err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "–"
                    lines.append(f"| {task} | {metric} | {value:.4f} | {err} |")
        lines += ["", "![scores](eval/scores.png)", ""]
    else:
        lines += [t["no_eval"], ""]
    if evals["curves"]:
        lines += [t["curves"], ""] + [f"![{os.path.basename(p)}](eval/{os.path.basename(p)})" for p in evals["curves"]] + [""]
    if evals["needle"]:
        lines += [t["needle"].format(mode=evals["needle"]["mode"], step=evals["needle"]["step"]), "",
                  f"![needle](eval/{os.path.basename(evals['needle_png'])})", ""]
    return lines


def files_section(facts, t):
    def checked(kind):
        report = facts["verification"].get(kind)
        return t["verified"].format(argmax=report["argmax_agreement"], diff=report["max_logit_diff"]) if report else "–"

    rows = [t["files_header"], "|---|---|---|",
            f"| `model.safetensors` | {t['hf_row'].format(dtype=facts['dtype'])} | transformers: {checked('hf')} |"]
    for quant in facts["quants"]:
        rows.append(f"| `{facts['name']}-{quant}.gguf` | {t['gguf_row'].format(quant=quant)} | llama.cpp: {checked(quant)} |")
    rows.append(f"| `Modelfile` | {t['modelfile_row']} | |")
    return rows


def usage(facts, t):
    repo, name, quant = facts["repo_id"], facts["name"], facts["quants"][-1] if facts["quants"] else "q4_k_m"
    if facts["instruct"]:
        python = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n'
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
                  f'messages = [{{"role": "user", "content": "{t["question"]}"}}]\n'
                  f'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
                  f'print(tokenizer.decode(model.generate(ids, max_new_tokens=200)[0][ids.shape[1]:], skip_special_tokens=True))')
        cli = f'llama-cli -hf {repo}:{quant.upper()} -cnv\nllama-server -hf {repo}:{quant.upper()}   # OpenAI-compatible chat API'
        ollama = f'ollama run hf.co/{repo}:{quant.upper()} "{t["question"]}"'
    else:
        python = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n'
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n'
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
                  f'ids = tokenizer("{t["prompt"]}", return_tensors="pt").input_ids\n'
                  f'print(tokenizer.decode(model.generate(ids, max_new_tokens=60, do_sample=True)[0]))')
        cli = f'llama-cli -hf {repo}:{quant.upper()} -no-cnv -p "{t["prompt"]}" -n 60'
        ollama = f'ollama run hf.co/{repo}:{quant.upper()} "{t["prompt"]}"'
    local = f"# {name}-{quant}.gguf + Modelfile:\nollama create {name} -f Modelfile && ollama run {name}"
    return ["```python", python, "```", "", "```bash", cli, ollama, local, "```"]


def section(facts, lang):
    t = TEXT[lang]
    tokens = number(facts["tokens_seen"], lang) if facts["tokens_seen"] is not None else MISSING[lang]
    intro = t["instruct" if facts["instruct"] else "base"].format(
        name=facts["name"], params=number(facts["params"], lang), tokens=tokens, base=facts.get("base_run"), sft_data=facts.get("sft_data"))
    arch = [(FR_LABELS.get(k, k) if lang == "fr" else k, localize(v, lang)) for k, v in facts["architecture"]]
    lines = [f"## {t['heading']}", "", intro, "", f"### {t['model']}", "", table(arch), "",
             f"### {t['training']}", "", table(training_rows(facts, t, lang)), ""]
    lines += ["![loss](loss.png)", ""] if facts["loss_png"] else []
    lines += [f"### {t['data']}", ""] + data_section(facts, t, lang) + ["", f"### {t['evaluation']}", ""]
    lines += eval_section(facts, t)
    lines += [f"### {t['files']}", ""] + files_section(facts, t) + [""]
    if facts["revisions"]:
        optimizer = t["with_optimizer"] if facts["with_optimizer"] else ""
        lines += [f"### {t['revisions']}", "", t["revisions_intro"].format(optimizer=optimizer), "",
                  ", ".join(f"`{r}`" for r in facts["revisions"]), "", "```python",
                  f'AutoModelForCausalLM.from_pretrained("{facts["repo_id"]}", revision="{facts["revisions"][-1]}")',
                  "```", ""]
    lines += [f"### {t['usage']}", ""] + usage(facts, t) + ["", f"### {t['limitations']}", "",
                                                         t["limits_instruct" if facts["instruct"] else "limits_base"].format(context=number(facts["context"], lang)), ""]
    return lines


def render(facts):
    """README.md: the YAML header, then the card in English, then in French."""
    kind = "instruct" if facts["instruct"] else "base"
    return "\n".join([front_matter(facts), "", f"# {facts['name']} ({kind})", ""] + section(facts, "en")
                     + section(facts, "fr")).rstrip() + "\n"
