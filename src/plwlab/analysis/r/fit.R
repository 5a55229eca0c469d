# Reference fits with glmmTMB and mgcv: Rscript fit.R results.csv out.json
# The same models as plwlab.analysis / plwlab.gam, for users who want R's own numbers.
suppressPackageStartupMessages({library(glmmTMB); library(mgcv); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
d$y_mm <- ave(d$score, d$dataset, d$benchmark, FUN = function(s) if (max(s) > min(s)) (s - min(s)) / (max(s) - min(s)) else 0.5)
d$wp <- d$plw^0.30103
glmm <- list()
for (ds in sort(unique(d$dataset))) {
  x <- d[d$dataset == ds, ]
  n <- nrow(x)
  x$y <- (x$y_mm * (n - 1) + 0.5) / n
  warn <- character(0)
  m <- tryCatch(withCallingHandlers(
    glmmTMB(y ~ wp + I(wp^2) + (0 + wp + I(wp^2) | benchmark) + (1 | model), data = x, family = beta_family()),
    warning = function(w) { warn <<- c(warn, conditionMessage(w)); invokeRestart("muffleWarning") }),
    error = function(e) conditionMessage(e))
  if (is.character(m)) {  # glmmTMB stopped (e.g. "infinite or missing values in 'x'" checking the Hessian)
    glmm[[ds]] <- list(n = n, error = m, warnings = warn, clean = FALSE)
    next
  }
  cf <- summary(m)$coefficients$cond
  b1 <- cf["wp", 1]; b2 <- cf["I(wp^2)", 1]; v <- -b1 / (2 * b2)
  glmm[[ds]] <- list(
    n = n, convergence = m$fit$convergence, pd_hess = m$sdr$pdHess, warnings = warn,
    clean = m$fit$convergence == 0 && m$sdr$pdHess && length(warn) == 0,
    intercept = cf["(Intercept)", 1], b1 = b1, b2 = b2,
    se_intercept = cf["(Intercept)", 2], se_b1 = cf["wp", 2], se_b2 = cf["I(wp^2)", 2],
    p_b1 = cf["wp", 4], p_b2 = cf["I(wp^2)", 4],
    lambda = if (b2 < 0 && v > 0 && v <= 1) v^(1 / 0.30103) else NA,
    loglik = as.numeric(logLik(m)))
}
g <- gam(y_mm ~ te(plw, rg, k = 3) + factor(benchmark), data = d)
plw <- seq(0, 1, by = 0.001)
opt <- list()
for (rg in seq(0.5, 8, by = 0.5)) {
  nd <- data.frame(plw = plw, rg = rg, benchmark = d$benchmark[1])
  te <- predict(g, nd, type = "terms")[, "te(plw,rg)"]
  opt[[format(rg, nsmall = 1)]] <- plw[which.max(te)]
}
out <- list(glmm = glmm, gam = list(optimal_plw = opt, edf = sum(g$edf), gcv = g$gcv.ubre),
            versions = list(R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
                            mgcv = as.character(packageVersion("mgcv"))))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, na = "null", pretty = TRUE), args[2])
