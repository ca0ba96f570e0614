# bbb-proxy: the gateway only (no simulator is started, no dev tools installed).
#
#   docker build -t bbb-proxy .
#   docker run -p 8080:8080 -v $PWD/my-config.toml:/etc/bbb-proxy/config.toml:ro \
#              -v bbb-proxy-state:/var/lib/bbb-proxy bbb-proxy
#
# The mounted config must bind to all interfaces inside the container and
# should keep its state under the volume:
#   [proxy]
#   bind = "0.0.0.0:8080"
#   state_dir = "/var/lib/bbb-proxy"
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --home-dir /var/lib/bbb-proxy --shell /usr/sbin/nologin bbb-proxy \
    && install -d -o bbb-proxy -g bbb-proxy /var/lib/bbb-proxy \
    && install -d /etc/bbb-proxy

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && rm -rf /src

WORKDIR /var/lib/bbb-proxy
USER bbb-proxy
VOLUME ["/var/lib/bbb-proxy"]
ENV BBB_PROXY_CONFIG=/etc/bbb-proxy/config.toml
EXPOSE 8080

# Liveness only: /healthz answers 200 while the process serves (slim has no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

CMD ["bbb-proxy", "serve"]
