"""Training data: folder scans, aspect-ratio buckets and epoch plans, image loading and fitting,
the torch sampler and dataset, and reports. buckets, sample and report need only NumPy.
"""
