"""Text conditioning: the prompt syntaxes, 75-token chunks, the CLIP tokenizer and the long-prompt
encoder (penultimate layer, every chunk in one call).
"""
