"""Every public op documents itself with an example, and the example runs as written (through
the Triton kernels under the interpreter, as the rest of this folder does)."""
import doctest

import pytest

import hybrid_lm.kernels as kernels

OPS = [name for name in kernels.__all__ if name != "reference"]


@pytest.mark.parametrize("name", OPS)
def test_example_in_docstring_runs(name):
    op = getattr(kernels, name)
    for section in ("Args:", "Returns:", "Example::"):
        assert section in (op.__doc__ or ""), f"{name}'s docstring has no {section}"
    examples = doctest.DocTestFinder(recurse=False).find(op, name, globs={})
    assert examples and examples[0].examples, f"{name}'s docstring has no doctest example"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for example in examples:
        runner.run(example)
    assert runner.failures == 0, f"{name}'s docstring example fails (output above)"
