"""How a round's messages travel: the same round protocol (`comigs_hf.client`, `comigs_hf.server`) on three transports.

- `accelerate`: the clients are processes of one Accelerate job; the updates cross one collective.
- `hub`: clients that never talk to each other federate through one Hugging Face Hub repository; generalists are
  shared there as PEFT adapters tagged by round.
- `flower`: each client is a Flower SuperNode of its own organisation, the server a ServerApp (the `flower` extra).

A transport never imports another, and none names an algorithm (`comigs_hf.algorithms`): both are tested.
"""
