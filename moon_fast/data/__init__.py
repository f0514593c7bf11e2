"""Data: the product catalog format, the synthetic default catalog, tokenizers, image-text
co-augmentation, and packing into :mod:`moon_fast.data.batch` batches. See FORMAT.md."""

from moon_fast.data.batch import EncoderBatch, TripletBatch
from moon_fast.data.catalog import (
    BadRecordCounter,
    BadRecordError,
    Catalog,
    Product,
    TooManyBadRecords,
    Triplet,
)
from moon_fast.data.collate import SampleBuilder, collate_triplets, pack, prepare_triplet
from moon_fast.data.encode import encode_records, load_records
from moon_fast.data.images import ImageCache, default_image_processor, image_processor_for
from moon_fast.data.loader import TripletLoader
from moon_fast.data.synth import cache_dir, ensure_synthetic, synthesize
from moon_fast.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "EncoderBatch", "TripletBatch", "BadRecordCounter", "BadRecordError", "Catalog", "Product",
    "TooManyBadRecords", "Triplet", "SampleBuilder", "collate_triplets", "pack", "prepare_triplet",
    "encode_records", "load_records", "ImageCache", "default_image_processor", "image_processor_for",
    "TripletLoader", "cache_dir", "ensure_synthetic", "synthesize", "TextTokenizer", "load_tokenizer",
    "train_tokenizer",
]
