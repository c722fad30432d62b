"""Scripts that run the experiments of docs/results/ (each module opens with its command)."""
