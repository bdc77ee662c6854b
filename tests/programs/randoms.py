# Python's sources of nondeterminism: random, time, os.urandom, uuid4.
import os, random, time, uuid
random.seed()
print("random", [random.randint(0, 10**9) for _ in range(5)])
print("time", time.time(), time.monotonic() > 0)
print("urandom", os.urandom(16).hex())
print("uuid4", uuid.uuid4())
print("choice", random.choice(["a", "b", "c", "d"]), random.random())
