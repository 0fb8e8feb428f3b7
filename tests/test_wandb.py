"""Weights & Biases: real offline runs (``WANDB_MODE=offline``) of the HF Trainer callback, the Lightning callback
and the Accelerate wrapper, read back from the run's own files: the ``.wandb`` transaction log (history records:
the ``moe_balance/*`` scalars and the image entries) and the PNGs under ``files/media/images``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

wandb = pytest.importorskip("wandb")
pytest.importorskip("matplotlib")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from moe_balance.plot import HEATMAP_TAG, MAXVIO_TAG  # noqa: E402

from .accelerate_helpers import tracked_accelerate_run  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Offline, silent, everything under tmp_path; one intra-op thread for the tiny models. wandb keeps its
    settings (WANDB_DIR included) in a per-process singleton: torn down around each test."""
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "moe-balance-test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
    torch.set_num_threads(threads)


def _records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
    chunks with a 7-byte header each (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    raw, block, pos, chunks, pending = path.read_bytes(), 32768, 7, [], b""
    assert raw[:4] == b":W&B", raw[:7]
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # block tail too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(data)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + data
        elif kind == 4:
            chunks.append(pending + data)
    records = []
    for data in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        records.append(record)
    return records


def read_run(root: Path) -> tuple[list[dict], Path]:
    """History rows (key -> decoded value) of the one offline run under ``root``, and its ``files`` folder."""
    (run_file,) = root.rglob("offline-run-*/run-*.wandb")
    rows = []
    for record in _records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows, run_file.parent / "files"


def assert_images_and_scalars(root: Path, scalar: str, image_steps: int) -> list[dict]:
    rows, files = read_run(root)
    assert rows and any(scalar in row for row in rows), sorted({k for row in rows for k in row})
    values = [row[scalar] for row in rows if scalar in row]
    assert all(isinstance(v, float | int) and v >= 0 for v in values)
    for tag in (HEATMAP_TAG, MAXVIO_TAG):
        entries = [row for row in rows if f"{tag}/path" in row]
        assert len(entries) == image_steps, (tag, entries)
        for row in entries:
            assert row[f"{tag}/_type"] == "image-file" and row[f"{tag}/width"] > 100
            png = files / row[f"{tag}/path"]
            assert png.read_bytes()[:8] == PNG  # the picture itself is in the run's files
    assert len(list((files / "media" / "images").rglob("*.png"))) == 2 * image_steps
    return rows


def close_runs() -> None:
    """Finish the run and shut the wandb service down: it writes the ``.wandb`` file asynchronously, and
    after other tests in the same process a finished run's file was still only its 7-byte header."""
    wandb.finish()
    wandb.teardown()


def test_hf_trainer_reports_to_wandb(tmp_path):
    from transformers import Trainer

    from moe_balance.integrations.hf import MoEBalanceCallback

    from .hf_helpers import args, datasets, load, saved_checkpoint
    train_ds, _ = datasets(n_train=24)
    trainer = Trainer(model=load(saved_checkpoint("mixtral", tmp_path / "ckpt")),
                      args=args(tmp_path / "out", max_steps=6, logging_steps=1, per_device_train_batch_size=4,
                                report_to=["wandb"]),
                      train_dataset=train_ds, callbacks=[MoEBalanceCallback(bias_update="sign", heatmap_every=4)])
    trainer.train()
    close_runs()
    rows = assert_images_and_scalars(tmp_path, "train/moe_balance/maxvio_global", image_steps=2)
    # images ride on the reporter's own rows: logging steps 1 and 5 (every 4th logging event, first included)
    assert [row["train/global_step"] for row in rows if f"{HEATMAP_TAG}/path" in row] == [1, 5]
    assert any("train/moe_balance/bias_abs_max" in row for row in rows)


def test_lightning_reports_to_wandb(tmp_path):
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import WandbLogger

    from moe_balance.integrations.lightning import MoEBalanceCallback

    from .lightning_helpers import CausalLM, loader, skewed_model, trainer
    logger = WandbLogger(project="moe-balance-test", save_dir=str(tmp_path), offline=True)
    cb = MoEBalanceCallback(bias_update="sign", heatmap_every=2)
    trainer(tmp_path, max_steps=8, callbacks=[cb], logger=logger, log_every_n_steps=2).fit(
        CausalLM(skewed_model()), loader(n=16, bs=2))
    close_runs()
    rows = assert_images_and_scalars(tmp_path, "moe_balance/maxvio_global", image_steps=2)
    assert any("moe_balance/bias_abs_max" in row for row in rows)


def test_accelerate_reports_to_wandb(tmp_path):
    tracked_accelerate_run(tmp_path, "wandb", "moe-balance-test")
    close_runs()
    rows = assert_images_and_scalars(tmp_path, "moe_balance/maxvio_global", image_steps=2)
    assert [row["_step"] for row in rows if f"{HEATMAP_TAG}/path" in row] == [2, 6]  # logs at 2, 4, 6: every 2nd
