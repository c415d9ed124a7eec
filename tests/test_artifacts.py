"""Every file accel saves has one envelope ({_type, _version, _data}); files written before it still load;
a file of another kind or from a newer accel is refused with a message naming it."""

from __future__ import annotations

import json

import pytest
import torch
from test_prune import dit_pool
from test_quest import _config
from tiny import TinyPipe, tiny_dit

import accel
from accel.artifacts import architecture_fingerprint, read_artifact, weights_digest, write_artifact
from accel.methods import hierarchical_prune as hp
from accel.methods import quest
from accel.methods.bac import calibrate
from accel.methods.bac_schedule import BACSchedule
from accel.prune.artifact import PruneArtifact
from accel.prune.sensitivity import SensitivityProfile, analyze_blocks


def _flatten(path, version: int = 1) -> dict:
    """Rewrite an enveloped file the way accel wrote it before the envelope: flat, format + version."""
    data = json.loads(path.read_text())
    flat = {"format": data["_type"], "version": version, **data["_data"]}
    path.write_text(json.dumps(flat))
    return data


def test_envelope_reader_refuses_other_kinds_and_newer_versions(tmp_path):
    path = write_artifact(tmp_path / "a.json", "accel.example", 2, {"x": 1})
    written = json.loads(path.read_text())
    assert written["_type"] == "accel.example" and written["_version"] == 2 and written["_data"] == {"x": 1}
    assert written["_accel"] == accel.__version__ and written["_created"].startswith("20")
    assert read_artifact(path, "accel.example", 2, "example", "remake") == ({"x": 1}, 2)
    with pytest.raises(accel.ArtifactMismatchError, match=r"a\.json is not a BAC schedule .*'accel.example'"):
        read_artifact(path, "accel.bac.schedule", 1, "BAC schedule", "remake")
    with pytest.raises(accel.ArtifactMismatchError, match=r"newer accel \(file version 2; this accel reads up to 1"):
        read_artifact(path, "accel.example", 1, "example", "remake")


def test_bac_schedule_in_an_envelope_and_from_before_it(tmp_path):
    pipe = TinyPipe()
    schedule = calibrate(pipe, num_inference_steps=5, config=accel.BACConfig(updates=2),
                         calls=[{"class_labels": [0]}])
    path = schedule.save(tmp_path / "s.json")
    assert json.loads(path.read_text())["_type"] == "accel.bac.schedule"
    _flatten(path)
    assert BACSchedule.load(path).to_json() == schedule.to_json()


def test_prune_artifact_and_profile_from_before_the_envelope(tmp_path):
    model = tiny_dit(4)
    config = hp.HierarchicalPruneConfig(ratio=0.25, distill_steps=2, batch_size=8, protect_first=0.25)
    hp.prune(model, config, analyze=False, pool=dit_pool(), save_to=tmp_path / "art", progress=False)
    _flatten(tmp_path / "art" / "hierarchical_prune.json")
    loaded = PruneArtifact.load(tmp_path / "art")
    assert loaded.removed == [3] and loaded.source == architecture_fingerprint(model)
    assert loaded.source_weights == weights_digest(model, rounded=True)
    profile = analyze_blocks(model, pool=dit_pool(16), progress=False)
    path = profile.save(tmp_path / "p.json")
    _flatten(path)
    assert SensitivityProfile.load(path).to_json() == profile.to_json()


def test_quest_artifact_of_version_1_keeps_loading_and_checking(tmp_path):
    """Version 1 digested the weights its own way: a file of that version is checked that way."""
    pipe = TinyPipe(layers=2)
    folder = quest.quantize(pipe, _config(bits="w8a8"), progress=False).save(tmp_path / "art")
    path = folder / "quest.json"
    data = json.loads(path.read_text())
    assert data["_type"] == "accel.quest" and data["_version"] == 2
    _flatten(path, version=1)
    flat = json.loads(path.read_text())
    flat["model"] = quest_fingerprint_v1(pipe.transformer)
    path.write_text(json.dumps(flat))
    loaded = quest.load(str(folder))
    assert loaded.version == 1
    loaded.check_model(pipe.transformer)  # no mismatch: the v1 digest is recomputed the v1 way
    with accel.patch(pipe, _config(bits="w8a8").replace(artifact=str(folder))) as patch:
        pipe([1], num_inference_steps=2)
        assert patch.report().methods["quest"]["bits"]
    with torch.no_grad():
        pipe.transformer.proj_out_2.weight.add_(1.0)
    with pytest.raises(accel.ArtifactMismatchError, match="the weights differ"):
        loaded.check_model(pipe.transformer)


def quest_fingerprint_v1(model: torch.nn.Module) -> str:
    from accel.quant.artifact import fingerprint_for

    return fingerprint_for(model, version=1)
