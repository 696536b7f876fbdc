"""Video/image data: manifest dataset, decoders (DALI GPU/CPU, PyAV), resumable sampler, latent cache."""

from engine.data.dataset import SkipItem, VideoDataset, bucket_batches, collate_videos
from engine.data.loader import BatchLoader
from engine.data.quarantine import Quarantine
from engine.data.sampler import ResumableSampler

__all__ = [
    "BatchLoader",
    "collate_videos",
    "Quarantine",
    "ResumableSampler",
    "SkipItem",
    "VideoDataset",
    "bucket_batches",
]
