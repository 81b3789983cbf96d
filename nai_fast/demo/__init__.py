"""The demonstration: the pretrained tiny model (:mod:`.pretrain`), the fidelity measure that
judges what it draws (:mod:`.fidelity`), and the demo that trains a style hypernetwork on it
(:mod:`.showcase`)."""
