"""rodin/ship/publish.py and rodin/ship/modelcard.py: a release to a local folder laid out as the Hub repo holds
every file, its GGUFs pass llama.cpp's verification, its card names the run's sources, licences and
scores in English and French, revisions load back bit for bit with their optimizer state, and a
second publish uploads nothing."""

import dataclasses
import gzip
import itertools
import json
import os
import subprocess

import pytest
import torch
from conftest import CORPUS

import train
from data import encode, mix
from rodin.config import MODELS
from rodin.eval import curves
from rodin.model import LLaMA
from rodin.ship import publish
from rodin.train import checkpoint

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")

HF_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "special_tokens_map.json")


@pytest.fixture(scope="module")
def mixed_run(demo_data, tmp_path_factory):
    """A run trained on a data/mix.py mixture of two registry sources (wikipedia, legi), with
    checkpoints at steps 10, 20, 30 and an lm-eval result for the newest."""
    root = tmp_path_factory.mktemp("publish")
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in itertools.islice(f, 4000)]
    for k, source in enumerate(("wikipedia", "legi")):
        os.makedirs(root / "clean" / source)
        with gzip.open(root / "clean" / source / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
            for i in range(k * 2000, (k + 1) * 2000, 10):
                f.write(json.dumps({"text": "\n".join(lines[i : i + 10])}, ensure_ascii=False) + "\n")
    mix.main([str(root / "clean"), f"--out={root / 'mix.json'}", "--weights=legi=2", "--val_fraction=0.05"])
    encode.main([f"--mixture={root / 'mix.json'}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={root / 'tokens'}",
                 "--workers=1"])
    argv = ["--preset=test", f"--data_dir={root / 'tokens'}", f"--tokenizer={demo_data['tokenizer']}", f"--out_dir={root}",
            "--name=base", "--max_steps=30", "--eval_every=10", "--ckpt_every=10", "--keep_checkpoints=5"]
    assert train.main(argv) == 0
    run_dir = str(root / "base")
    results = {"results": {"littre_cloze": {"alias": "littre_cloze", "acc,none": 0.3125, "acc_stderr,none": 0.0202,
                                            "acc_norm,none": 0.2841, "acc_norm_stderr,none": 0.0196, "sample_len": 528}},
               "n-shot": {"littre_cloze": 3}}
    os.makedirs(os.path.join(run_dir, "eval"))
    with open(os.path.join(run_dir, "eval", "step-0000030.json"), "w") as f:
        json.dump(results, f)
    rows = curves.rows_from_results(results, 30, 30 * 128, 3, ["littre_cloze"])
    curves.plot_curves([("", rows)], os.path.join(run_dir, "eval"))
    return run_dir


@pytest.fixture(scope="module")
def release(mixed_run, tmp_path_factory):
    repo = str(tmp_path_factory.mktemp("hub") / "rodin-test")
    uploaded = publish.publish(mixed_run, repo, revisions=True, with_optimizer=True, threads=1)
    return repo, uploaded


def test_a_release_holds_the_model_the_ggufs_the_modelfile_and_the_card(mixed_run, release):
    repo, uploaded = release
    main = os.path.join(repo, "main")
    for name in HF_FILES + ("README.md", "Modelfile", "loss.png", "eval/scores.png", "eval/curve-littre_cloze.png",
                            "rodin-test-f16.gguf", "rodin-test-q8_0.gguf", "rodin-test-q4_k_m.gguf"):
        assert os.path.getsize(os.path.join(main, name)) > 0, name
    assert sorted(uploaded) == ["main", "step0000010", "step0000020", "step0000030"]
    assert set(uploaded["main"]) == set(publish.release_files(main))
    assert "FROM ./rodin-test-q4_k_m.gguf" in open(os.path.join(main, "Modelfile")).read()
    # each GGUF passed llama.cpp's verification before anything was uploaded
    figures = json.load(open(os.path.join(mixed_run, "release", "main", ".verification.json")))
    assert set(figures) == {"hf", "f16", "q8_0", "q4_k_m"} and figures["hf"]["argmax_agreement"] == 1.0
    assert figures["f16"]["argmax_agreement"] >= 0.99 and figures["q4_k_m"]["argmax_agreement"] >= 0.8


def test_the_card_names_the_sources_licences_and_scores_in_english_then_french(mixed_run, release):
    card = open(os.path.join(release[0], "main", "README.md"), encoding="utf-8").read()
    header = card.split("---")[1]
    assert "license: apache-2.0" in header and "- wikimedia/wikipedia" in header and "- AgentPublic/legi" in header
    english, french = card.index("## English"), card.index("## Français")
    assert english < french
    shares = {n: s["share"] for n, s in json.load(open(os.path.join(os.path.dirname(mixed_run), "mix.json")))["sources"].items()}
    assert shares["legi"] > 0.6  # weighted x2
    for part in (card[english:french], card[french:]):
        # the manifest's sources, with their licences from data/sources.json and their shares of the mixture
        assert f"| legi | AgentPublic/legi | Licence Ouverte / etalab-2.0 | {shares['legi']:.1%} |" in part
        assert f"| wikipedia | wikimedia/wikipedia | CC-BY-SA-3.0 and GFDL | {shares['wikipedia']:.1%} |" in part
        assert "| littre_cloze | acc | 0.3125 | 0.0202 |" in part
        assert "![curve-littre_cloze.png](eval/curve-littre_cloze.png)" in part
        assert "rodin-test-q4_k_m.gguf" in part and "step0000030" in part
        assert 'tokenizer("La Fontaine écrivit"' in part and "apply_chat_template" not in part  # a base model
    meta = checkpoint.read_meta(checkpoint.latest(mixed_run))
    tokens = f"{meta['tokens_seen']:,}"
    assert f"| tokens seen | {tokens} |" in card and f"| tokens vus | {tokens.replace(',', chr(0x202f))} |" in card
    assert " on 1 x CPU (" in card and " sur 1 x CPU (" in card  # the hardware metrics.jsonl recorded
    assert "| layers | 2 |" in card and "| couches | 2 |" in card


def test_revisions_load_back_bit_exactly_with_their_optimizer_state(mixed_run, release):
    for ckpt in checkpoint.complete_checkpoints(mixed_run):
        meta = checkpoint.read_meta(ckpt)
        model, optimizer, state = publish.load_revision(os.path.join(release[0], publish.revision_name(meta["step"])))
        original = LLaMA(model.cfg)
        original_optimizer = publish.training_optimizer(original, meta["config"])
        checkpoint.load(ckpt, original, original_optimizer, restore_rng_state=False)
        assert_same_training_state(model, optimizer, original, original_optimizer)
        assert state["step"] == meta["step"] and state["tokens_seen"] == meta["tokens_seen"]
        assert state["param_names"][0] == "model.embed_tokens.weight" and len(state["param_names"]) == len(list(model.parameters()))


def assert_same_training_state(model, optimizer, original, original_optimizer):
    for (name, a), b in zip(original.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    mine, theirs = optimizer.state_dict(), original_optimizer.state_dict()
    as_json = lambda groups: json.loads(json.dumps(groups))  # noqa: E731 (betas: a tuple, or a list read from JSON)
    assert as_json(mine["param_groups"]) == as_json(theirs["param_groups"]) and mine["state"].keys() == theirs["state"].keys()
    for i, per_param in theirs["state"].items():
        for key, value in per_param.items():
            assert torch.equal(mine["state"][i][key], value), (i, key)


def test_a_second_publish_uploads_nothing_and_a_new_checkpoint_only_what_changed(demo_data, mixed_run, release, monkeypatch):
    repo, _ = release
    before = {p: os.stat(p).st_mtime_ns for p in publish.release_files(repo).values()}
    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt although the checkpoint did not change")
    monkeypatch.setattr(publish, "write_hf", no_rebuild)
    assert publish.publish(mixed_run, repo, revisions=True, with_optimizer=True, threads=1) == {
        "main": [], "step0000010": [], "step0000020": [], "step0000030": []}
    assert {p: os.stat(p).st_mtime_ns for p in publish.release_files(repo).values()} == before
    monkeypatch.undo()

    config = json.load(open(os.path.join(mixed_run, "config.json")))
    argv = ["--preset=test", f"--data_dir={config['data_dir']}", f"--tokenizer={demo_data['tokenizer']}",
            f"--out_dir={os.path.dirname(mixed_run)}", "--name=base", "--max_steps=40", "--eval_every=10",
            "--ckpt_every=10", "--keep_checkpoints=5"]
    assert train.main(argv) == 0
    uploaded = publish.publish(mixed_run, repo, revisions=True, with_optimizer=True, threads=1)
    assert uploaded["step0000010"] == uploaded["step0000020"] == uploaded["step0000030"] == []
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= set(uploaded["step0000040"])
    assert {"model.safetensors", "README.md", "rodin-test-q8_0.gguf", "loss.png"} <= set(uploaded["main"])
    assert "config.json" not in uploaded["main"] and "tokenizer.model" not in uploaded["main"]  # unchanged


def test_milestones_are_the_multiples_of_keep_every_when_the_run_has_it(tmp_path, demo_data):
    from conftest import make_run

    for step in (5, 10, 15, 20):
        run_dir, _ = make_run(tmp_path, demo_data["tokenizer"], step=step, keep=10)
    assert [checkpoint.read_meta(c)["step"] for c in publish.milestones(run_dir)] == [5, 10, 15, 20]
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"keep_every": 10}, f)
    assert [publish.revision_name(checkpoint.read_meta(c)["step"]) for c in publish.milestones(run_dir)] == \
        ["step0000010", "step0000020"]


@pytest.mark.parametrize("optimizer_name", ["adamw", "muon"])
def test_a_distributed_checkpoint_is_published_with_its_optimizer_state_in_safetensors(tmp_path, demo_data, optimizer_name):
    import torch.distributed as dist

    from rodin.config import PRESETS, config_to_dict
    from rodin.data.tokenizer import Tokenizer

    cfg = dataclasses.replace(PRESETS["test"], model=MODELS["test"], tokenizer=demo_data["tokenizer"], optimizer=optimizer_name)
    torch.manual_seed(0)
    model = LLaMA(cfg.model)
    optimizer = publish.training_optimizer(model, config_to_dict(cfg))
    tokens = torch.randint(0, 512, (2, 16))
    model(tokens, tokens)[1].backward()
    optimizer.step()
    meta = {"config": config_to_dict(cfg), "tokenizer": Tokenizer(demo_data["tokenizer"]).fingerprint, "tokens_seen": 64}
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:  # one process writes the torch.distributed.checkpoint that torchrun writes
        ckpt = checkpoint.save_sharded(str(tmp_path / "run"), 5, model, optimizer, meta, keep=2)
    finally:
        dist.destroy_process_group()
    assert checkpoint.is_dcp(ckpt) and not os.path.exists(os.path.join(ckpt, "optimizer.safetensors"))
    folder = str(tmp_path / "revision")
    assert publish.build_revision(folder, ckpt, "run", "apache-2.0", True, None, check=True)
    back, back_optimizer, state = publish.load_revision(folder)
    assert_same_training_state(back, back_optimizer, model, optimizer)
    assert not publish.build_revision(folder, ckpt, "run", "apache-2.0", True, None, check=True)  # built once
    assert state["optimizer"].startswith({"adamw": "AdamW", "muon": "Muon"}[optimizer_name])
    assert len(state["param_names"]) == sum(len(g["params"]) for g in optimizer.param_groups)


class FakeHub:
    """huggingface_hub.HfApi's calls publish makes, on a dict: files above 1 KB are LFS (sha256),
    smaller ones are git blobs, as on the Hub."""

    def __init__(self):
        self.branches, self.commits = {}, []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.branches.setdefault("main", {".gitattributes": b"*.safetensors filter=lfs\n"})

    def list_repo_tree(self, repo_id, recursive=False, revision=None):
        from huggingface_hub.errors import RevisionNotFoundError
        from huggingface_hub.hf_api import RepoFile

        if revision not in self.branches:
            import httpx

            url = f"https://huggingface.co/api/models/{repo_id}/tree/{revision}"
            raise RevisionNotFoundError(f"no revision {revision}", response=httpx.Response(404, request=httpx.Request("GET", url)))
        for path, data in self.branches[revision].items():
            lfs = {"size": len(data), "oid": publish.hashlib.sha256(data).hexdigest(), "pointerSize": 130} if len(data) > 1024 else None
            git = publish.hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            yield RepoFile(path=path, size=len(data), oid=git, lfs=lfs)

    def list_repo_commits(self, repo_id):
        return [type("Commit", (), {"commit_id": "c%d" % i}) for i in range(len(self.commits), -1, -1)]

    def create_branch(self, repo_id, branch, revision=None, exist_ok=False):
        assert revision == "c0"  # from the first commit: the branch holds its own files only
        self.branches[branch] = {".gitattributes": self.branches["main"][".gitattributes"]}

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        self.commits.append((revision, sorted(op.path_in_repo for op in operations)))
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                self.branches[revision][op.path_in_repo] = f.read()


def test_the_hub_gets_one_commit_of_the_changed_files_per_revision(mixed_run, release, tmp_path):
    hub = FakeHub()
    repo = publish.HubRepo("org/rodin-test", api=hub)
    repo.prepare()
    hashes = publish.HashCache(str(tmp_path / "hashes.json"))
    built = os.path.join(mixed_run, "release")
    for revision in ("main", "step0000010"):
        folder = os.path.join(built, "main" if revision == "main" else f"revisions/{revision}")
        assert publish.publish_folder(repo, revision, folder, "release", hashes) == sorted(publish.release_files(folder))
        assert publish.publish_folder(repo, revision, folder, "again", hashes) == []  # LFS sha256 and git ids match
    assert [revision for revision, _ in hub.commits] == ["main", "step0000010"]
    revision = publish.release_files(os.path.join(built, "revisions", "step0000010"))
    assert set(hub.branches["step0000010"]) == set(revision) | {".gitattributes"}  # none of main's files


def test_an_export_that_fails_verification_stops_the_release_before_any_upload(mixed_run, tmp_path, monkeypatch):
    real = publish.verify.check_llama_cpp

    def disagreeing(*args, **kwargs):
        return dict(real(*args, **kwargs), argmax_agreement=0.5)

    monkeypatch.setattr(publish.verify, "check_llama_cpp", disagreeing)
    with pytest.raises(ValueError, match=r"llama.cpp \(f16\) disagrees with the checkpoint: argmax agreement 50.00% < 99%"):
        publish.publish(mixed_run, str(tmp_path / "hub"), quants=["f16"], out=str(tmp_path / "release"), threads=1)
    assert not os.path.exists(tmp_path / "hub") and not os.path.exists(tmp_path / "release" / "main")


def test_git_blob_ids_are_those_of_git(tmp_path):
    path = tmp_path / "card.md"
    path.write_text("# rodin\n\nUn modèle français.\n", encoding="utf-8")
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert publish.git_blob_sha1(str(path)) == expected


def test_a_hub_id_is_org_slash_name_and_anything_else_a_folder():
    assert not publish.is_local("OpenLLM-France/Lucie-7B")
    assert all(publish.is_local(p) for p in ("/tmp/hub/x", "./hub/x", "hub/org/x", "folder"))


def test_an_sft_run_is_published_as_an_instruct_model_with_chat_usage(mixed_run, tmp_path):
    from conftest import littre_slice, write_jsonl

    import sft

    data = write_jsonl(tmp_path / "chat.jsonl", littre_slice(40))
    assert sft.main(["--preset=test", f"--init_from={mixed_run}", f"--data={data}", f"--out_dir={tmp_path}", "--name=chat",
                     "--max_steps=2", "--truncate=true", "--val_fraction=0.2"]) == 0
    repo = tmp_path / "hub" / "rodin-test-instruct"
    publish.publish(str(tmp_path / "chat"), str(repo), quants=["q8_0"], base_model="ORG/rodin-test", threads=1)
    card = (repo / "main" / "README.md").read_text(encoding="utf-8")
    assert "# rodin-test-instruct (instruct)" in card and "- conversational" in card and "base_model: ORG/rodin-test" in card
    english, french = card.split("## Français")
    assert "French instruct (chat) model" in english and "modèle instruct (conversationnel)" in french
    for part in (english, french):
        assert "the base model `base`" in part or "le modèle de base `base`" in part
        assert "apply_chat_template" in part and "-cnv" in part and f"`{data}`" in part
        # the pretraining sources of the base model, from its run directory
        assert "| legi | AgentPublic/legi | Licence Ouverte / etalab-2.0 |" in part
    assert "<|im_start|>" in (repo / "main" / "tokenizer_config.json").read_text()


def test_the_command_refuses_an_optimizer_state_without_revisions_in_one_line(mixed_run, tmp_path):
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "rodin", "publish", mixed_run, f"--repo={tmp_path / 'hub'}", "--with_optimizer"],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr == "error: --with_optimizer publishes the optimizer state of the revisions; add --revisions\n"
