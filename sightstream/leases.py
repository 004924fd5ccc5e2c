"""Leases in Redis: a key holding its owner's token with a TTL, renewed while the owner
lives. Used for stable consumer names (daemon/consumer.py) and per-source readers
(stages/source_leases.py)."""

from __future__ import annotations

# Renew if ours, else take it if free. 1: held by us now; 0: someone else holds it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
# Delete only if ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
