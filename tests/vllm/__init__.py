"""Tests of the vLLM connector against real vLLM classes (on CPU)."""
