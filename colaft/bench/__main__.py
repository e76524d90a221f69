"""`python -m colaft.bench ...` runs the bench commands without the main CLI."""
from colaft.bench import bench_app

if __name__ == "__main__":  # memory processes re-import this module under another name
    bench_app(prog_name="colaft bench")
