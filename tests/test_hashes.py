"""A1111 model hashes and the hash cache."""

import hashlib
import os

from app.models.hashes import HashCache, old_hash, sha256_of, short_hash


def test_short_and_old_hash(tmp_path):
    data = os.urandom(0x100000 + 0x10000 + 100)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert sha256_of([path]) == full
    assert short_hash(full) == full[:10]
    assert old_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_cache_reuses_by_size_and_mtime_and_survives_restart(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(b"a" * 1000)
    cache_file = tmp_path / "cache.json"
    first = HashCache(cache_file).sha256("m", [path])
    stat = path.stat()
    # Same size and mtime with other bytes: the cache answers without reading the file (proof it is used).
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert HashCache(cache_file).sha256("m", [path]) == first
    # A new mtime means the file changed: hashed again.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert HashCache(cache_file).sha256("m", [path]) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_unreadable_cache_file_is_ignored(tmp_path):
    cache_file = tmp_path / "cache.json"
    cache_file.write_text("{not json")
    path = tmp_path / "m.bin"
    path.write_bytes(b"x")
    assert HashCache(cache_file).sha256("m", [path]) == hashlib.sha256(b"x").hexdigest()
