# codex-gateway image: built in one stage, run from a slim one as an unprivileged user.
#   docker build --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t codex-gateway .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/codex-gateway
WORKDIR /src
COPY pyproject.toml README.md ./
COPY codex_gateway ./codex_gateway
RUN /opt/codex-gateway/bin/pip install .

FROM python:3.11-slim
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="codex-gateway" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
# The commit is baked in here; `codex-gateway version` and /healthz show it.
ENV PATH=/opt/codex-gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CODEX_GATEWAY_BUILD_COMMIT=${GIT_COMMIT}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/codex-gateway \
        --create-home --shell /usr/sbin/nologin codex-gateway \
    && mkdir -p /var/lib/codex-gateway/data \
    && chown codex-gateway:codex-gateway /var/lib/codex-gateway/data
COPY --from=build /opt/codex-gateway /opt/codex-gateway
USER codex-gateway
WORKDIR /var/lib/codex-gateway
# data/ holds the spool of usage rows the database could not take; keep it on a volume.
VOLUME ["/var/lib/codex-gateway/data"]
EXPOSE 8787
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=6s --start-period=20s --retries=3 \
    CMD ["codex-gateway", "health", "--url", "http://127.0.0.1:8787"]
ENTRYPOINT ["codex-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8787"]
