# voice-agent server image.
#   CPU:  docker build -t voice-agent .   (CPU torch from the PyTorch CPU index)
#   GPU:  docker build --build-arg TORCH_SPEC="torch==2.13.0" --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t voice-agent .
# Run with the weights mounted:  docker run -p 8000:8000 -v $PWD/models:/app/models voice-agent
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY voice_agent ./voice_agent
COPY static ./static
COPY scripts ./scripts
RUN python -m venv .venv \
 && if [ -n "$TORCH_INDEX" ]; then .venv/bin/pip install --no-cache-dir --index-url "$TORCH_INDEX" "$TORCH_SPEC"; \
    else .venv/bin/pip install --no-cache-dir "$TORCH_SPEC"; fi \
 && scripts/install.sh
ENV VOICE_AGENT_HOST=0.0.0.0
EXPOSE 8000
CMD [".venv/bin/voice-agent", "serve"]
