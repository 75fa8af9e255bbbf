"""One export of a completed job, from its adapter in storage to its files in storage.

The story: fetch the job's adapter and tokenizer → merge them into the base (`merge`; a full
fine-tune's artifacts are the model itself, used as they are) → for
GGUF, convert (`gguf_export`) and write the Modelfile (`modelfile`) → upload under
`jobs/{job_id}/exports/{kind}/` → record the export's outcome. Only the export row is written:
the job stays as it was, whatever happens here. Log lines go to the job's log, as
`export {kind}: ...`, so that a failed conversion's output can be read where the job's is.
"""

from __future__ import annotations

import logging
import shutil
import traceback
from pathlib import Path

from shared import exports, jobs
from shared.artifacts import list_artifacts
from shared.db import session_scope
from shared.exports import ExportClaim
from shared.models import Job
from shared.schema import ExportRequest
from shared.settings import Settings
from shared.storage import Storage, storage_from_settings
from shared.storage_keys import (
    ADAPTER_FILES,
    FULL_MODEL_CONFIG,
    artifact_name,
    is_full_model_weights,
    job_export_prefix,
)
from worker.pipeline.errors import PipelineError
from worker.pipeline.report import LogFn

log = logging.getLogger("tunery.worker")


def run_export(claim: ExportClaim, settings: Settings) -> bool:
    """Run the claimed export and record COMPLETED or FAILED; never raises. Returns whether
    it completed."""
    from worker.pipeline.job_dirs import job_working_directory

    with session_scope() as session:
        job = session.get_one(Job, claim.job_id)
        model_path = str(job.payload["pretrainedmodel_config"]["model_path"])
        job_attempt = job.attempt

    def log_line(line: str) -> None:
        with session_scope() as session:
            jobs.append_log(session, claim.job_id, job_attempt, f"export {claim.kind}: {line}")

    assert settings.training.work_dir is not None
    work_dir = Path(settings.training.work_dir) / f"export-{claim.export_id}-{claim.attempt}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    files: list[str] | None = None
    error: str | None = None
    try:
        log_line(f"started on {claim.owner}")
        with job_working_directory(work_dir / "cwd"):
            files = export_files(claim, model_path, work_dir, settings,
                                 storage_from_settings(settings), log_line)
        log_line(f"uploaded {len(files)} files")
    except PipelineError as exc:
        error = exc.message
    except Exception as exc:
        log.error("export %s of job %s crashed\n%s", claim.export_id, claim.job_id,
                  traceback.format_exc())
        error = f"internal error: {type(exc).__name__}: {exc}"[:2000]
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if error is not None:
        log_line(f"failed: {error}")
    with session_scope() as session:
        recorded = exports.finish_export(session, claim, files=files, error=error)
    if not recorded:
        log.warning("export %s: outcome not recorded, another run owns it", claim.export_id)
    return recorded and error is None


def export_files(
    claim: ExportClaim, model_path: str, work_dir: Path, settings: Settings, storage: Storage,
    log: LogFn,
) -> list[str]:
    """Build the export in `work_dir` and upload it; the artifact names it stored."""
    from worker.pipeline.gguf_export import convert_to_gguf, gguf_file_name
    from worker.pipeline.job_dirs import existing_tenant_hub_cache
    from worker.pipeline.merge import merge_adapter
    from worker.pipeline.modelfile import write_modelfile

    spec = ExportRequest.of_kind(claim.kind)
    adapter_dir = download_adapter(storage, claim.job_id, work_dir / "adapter")
    # A job trained with a token downloaded its base into its tenant's cache, and the token
    # left with the job's end: read it from there, offline. Else as training read it.
    cache = existing_tenant_hub_cache(settings.local_files_dir(), claim.tenant_id)
    if cache is not None and not (cache / hub_cache_folder(model_path)).is_dir():
        cache = None
    if is_full_model_dir(adapter_dir):
        # A full fine-tune's artifacts are the whole model already: nothing to merge.
        log("the job trained the whole model (use_lora false): exported as it is, unmerged")
        merged = adapter_dir
    else:
        merged = merge_adapter(
            model_path, adapter_dir, work_dir / "merged",
            allowed_local_dirs=settings.sources.allowed_local_dirs, cache_dir=cache,
            local_files_only=cache is not None, cpu_bf16=settings.training.cpu_bf16, log=log,
        )
    if spec.quantization is None:
        return upload_folder(storage, claim.job_id, claim.kind, merged)
    out_dir = work_dir / claim.kind
    gguf = convert_to_gguf(merged, out_dir / gguf_file_name(spec.quantization),
                           spec.quantization, scratch_dir=work_dir / "cwd", log=log)
    from transformers import AutoTokenizer

    # The merged folder's tokenizer is the one the job trained with.
    tokenizer = AutoTokenizer.from_pretrained(str(merged), trust_remote_code=False)
    write_modelfile(out_dir, gguf.name, tokenizer, merged)
    shutil.rmtree(merged)  # disk: a 7B model in bf16 is 14 GB, its GGUF as much again
    return upload_folder(storage, claim.job_id, claim.kind, out_dir)


def is_full_model_dir(artifacts_dir: Path) -> bool:
    """Whether a job's downloaded artifacts are a full fine-tune's model (`model_export`),
    not a LoRA adapter."""
    names = {p.name for p in artifacts_dir.iterdir()}
    return (FULL_MODEL_CONFIG in names and ADAPTER_FILES[0] not in names
            and any(map(is_full_model_weights, names)))


def hub_cache_folder(model_id: str) -> str:
    """Where huggingface_hub caches the model repo `model_id` inside a cache directory."""
    return "models--" + model_id.replace("/", "--")


def download_adapter(storage: Storage, job_id: str, dest: Path) -> Path:
    """The job's own artifacts (adapter and tokenizer files, not its exports) into `dest`."""
    dest.mkdir(parents=True)
    found = list_artifacts(storage, job_id, exports=False)
    if not found:
        raise PipelineError(f"job {job_id} has no artifacts in storage to export")
    for artifact in found:
        if "/" not in artifact.name:
            storage.download_file(artifact.key, dest / artifact.name)
    return dest


def upload_folder(storage: Storage, job_id: str, kind: str, folder: Path) -> list[str]:
    """Upload the files of `folder` under the export's prefix; their artifact names."""
    prefix = job_export_prefix(job_id, kind)
    # A new run replaces what an earlier, failed one left.
    storage.delete_prefix(prefix)
    names = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        storage.put_file(prefix + path.name, path)
        name = artifact_name(job_id, prefix + path.name)
        assert name is not None
        names.append(name)
    return names
