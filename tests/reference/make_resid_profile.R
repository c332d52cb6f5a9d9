# Reference profile-likelihood 95 % intervals for a linear mixed model with AR(1) residuals,
# computed with glmmTMB (ML, not REML) on the pig data shipped with jaxmixed:
#   weight_ij = b0 + b1 * week_ij + u_i + e_ij,  u_i ~ N(0, sd_id^2),
#   e_i ~ N(0, s^2 * AR1(rho)) within pig i (48 pigs x 9 weeks), i.e. V_i = sd_id^2 J + s^2 AR1(rho).
# glmmTMB: weight ~ week + (1|id) + ar1(0 + factor(week) | id), dispformula = ~0 (the residual
# variance is then fixed at a negligible 1.5e-8, so the ar1 term is the residual).
# Exact profile roots (no splines): for psi in {(Intercept), week, sd_id, s, rho},
# D(psi) = -2 max logLik with psi held fixed, and the limits solve D(psi) - D_hat = z^2
# (z = qnorm(0.975)) by uniroot (tol 1e-10) after stepping outward from the estimate.
# Fixed effects are held with an offset; variance parameters with glmmTMB's map/start on theta
# (theta = log sd_id, log s, rho / sqrt(1 - rho^2); glmmTMB's rho = theta / sqrt(1 + theta^2)).
# The ML estimate of sd_id is on the boundary 0, so every D(psi) is the smaller of the fit with
# (1|id) free and the fit without (1|id) (sd_id = 0); each fit is polished by Newton steps.
# Cross-checks: nlme::lme with corAR1 (ML), and the same profile roots from an independent exact
# Gaussian likelihood in plain R (lower_exact/upper_exact), which is more precise than glmmTMB here.
# Run: Rscript tests/reference/make_resid_profile.R   (from anywhere; writes resid_profile.json
# next to this script and prints it).
suppressPackageStartupMessages({ library(glmmTMB); library(nlme); library(jsonlite) })

args <- commandArgs(trailingOnly = FALSE)
f <- sub("^--file=", "", args[grep("^--file=", args)])
here <- if (length(f)) dirname(normalizePath(f[1])) else getwd()
d <- read.csv(file.path(here, "..", "..", "jaxmixed", "data", "datasets", "pig.csv"))
d <- d[order(d$id, d$week), ]
d$id <- factor(d$id)
stopifnot(nrow(d) == 432, nlevels(d$id) == 48, all(table(d$id) == 9))
z <- qnorm(0.975)
rho_of <- function(t) t / sqrt(1 + t^2)          # glmmTMB's ar1 correlation transform
theta_of <- function(r) r / sqrt(1 - r^2)
pnames <- c("(Intercept)", "week", "sd_id", "s", "rho")

# ---- one constrained fit: 'which' held at 'value' (natural scale), ri = include (1|id) -------
newton_polish <- function(obj, par, it = 6) {
  fn <- obj$fn(par)
  for (k in seq_len(it)) {
    g <- as.numeric(obj$gr(par))
    if (max(abs(g)) < 1e-9) break
    H <- tryCatch(optimHess(par, obj$fn, obj$gr), error = function(e) NULL)
    if (is.null(H)) break
    step <- tryCatch(solve(H, g), error = function(e) NULL)
    if (is.null(step) || any(!is.finite(step))) break
    p1 <- par - step; f1 <- obj$fn(p1)
    if (!is.finite(f1) || f1 > fn + 1e-12) break
    par <- p1; fn <- f1
  }
  fn <- obj$fn(par)
  list(par = par, fn = fn, maxgrad = max(abs(obj$gr(par))))
}
start0 <- c(b0 = 18.8, b1 = 6.27, sd_id = 0.5, s = 4.6, rho = 0.94)   # generic start values
fit_one <- function(which = "none", value = NA, ri = TRUE, st = start0) {
  st[which] <- value
  off <- NULL
  fx <- "weight ~ week"; beta0 <- unname(st[c("b0", "b1")])
  if (which == "(Intercept)") { fx <- "weight ~ 0 + week"; off <- rep(value, nrow(d)); beta0 <- st[["b1"]] }
  if (which == "week") { fx <- "weight ~ 1"; off <- value * d$week; beta0 <- st[["b0"]] }
  st[["sd_id"]] <- if (which == "sd_id") value else max(st[["sd_id"]], 0.5)  # start RI away from 0
  th <- c(log(st[["sd_id"]]), log(st[["s"]]), theta_of(st[["rho"]]))
  mp <- c(sd_id = 1, s = 2, rho = 3)
  if (which %in% names(mp)) mp[which] <- NA
  if (!ri) { th <- th[-1]; mp <- mp[-1] }
  mp <- factor(mp)
  form <- as.formula(paste(fx, if (ri) "+ (1 | id)", "+ ar1(0 + factor(week) | id)"))
  m <- suppressWarnings(glmmTMB(form, data = d, offset = off, dispformula = ~0, REML = FALSE,
                                start = list(beta = beta0, theta = th), map = list(theta = mp),
                                se = FALSE))
  pol <- newton_polish(m$obj, m$fit$par)
  pl <- m$obj$env$parList(pol$par)
  b <- pl$beta; t <- pl$theta
  if (which == "(Intercept)") b <- c(value, b)
  if (which == "week") b <- c(b, value)
  if (!ri) t <- c(-Inf, t)
  list(D = 2 * pol$fn, maxgrad = pol$maxgrad, conv = m$fit$convergence, msg = m$fit$message,
       par = c(b0 = b[1], b1 = b[2], sd_id = exp(t[1]), s = exp(t[2]), rho = rho_of(t[3])), ri = ri)
}
# profile deviance: minimum over "sd_id free (>0)" and "sd_id = 0" (except when sd_id is held)
prof <- function(which, value) {
  if (which == "sd_id") return(fit_one(which, value, ri = TRUE))
  a <- fit_one(which, value, ri = TRUE); b <- fit_one(which, value, ri = FALSE)
  if (a$D < b$D) a else b
}

# ---- the fits at the optimum -----------------------------------------------------------------
m <- glmmTMB(weight ~ week + (1 | id) + ar1(0 + factor(week) | id), data = d,
             dispformula = ~0, REML = FALSE)
th <- getME(m, "theta")
cor_report <- m$obj$env$report(m$obj$env$last.par.best)$corr[[2]][1, 2]
stopifnot(abs(cor_report - rho_of(th[3])) < 1e-12)                    # the ar1 transform
glmm_fit <- list(formula = "weight ~ week + (1 | id) + ar1(0 + factor(week) | id), dispformula = ~0, REML = FALSE",
                 logLik = as.numeric(logLik(m)), convergence = m$fit$convergence,
                 message = m$fit$message, pdHess = m$sdr$pdHess,
                 maxgrad = max(abs(m$obj$gr(m$fit$par))),
                 fixef = as.list(fixef(m)$cond), sd_id = exp(th[[1]]), s = exp(th[[2]]),
                 rho = rho_of(th[[3]]), theta = unname(th), residual_sd_dispformula0 = sigma(m))
# boundary fit (no (1|id): sd_id = 0), polished; this is the ML optimum
m0 <- glmmTMB(weight ~ week + ar1(0 + factor(week) | id), data = d, dispformula = ~0, REML = FALSE)
se0 <- sqrt(diag(m0$sdr$cov.fixed))          # SEs of beta, log s, theta_rho: step sizes only
opt <- prof("none", NA)
D_hat <- opt$D
mle <- opt$par
start0 <- mle; start0[["sd_id"]] <- 0.5
glmm_bnd <- list(formula = "weight ~ week + ar1(0 + factor(week) | id), dispformula = ~0, REML = FALSE",
                 logLik = -D_hat / 2, convergence = m0$fit$convergence, message = m0$fit$message,
                 pdHess = m0$sdr$pdHess, maxgrad_after_polish = opt$maxgrad,
                 fixef = list(`(Intercept)` = mle[["b0"]], week = mle[["b1"]]),
                 sd_id = 0, s = mle[["s"]], rho = mle[["rho"]], used_for_D_hat = !opt$ri)

nl <- lme(weight ~ week, random = ~ 1 | id, correlation = corAR1(form = ~ week | id),
          data = d, method = "ML",
          control = lmeControl(maxIter = 1000, msMaxIter = 1000, msMaxEval = 5000,
                               tolerance = 1e-12, msTol = 1e-14, returnObject = TRUE))
nlme_fit <- list(logLik = as.numeric(logLik(nl)), fixef = as.list(fixef(nl)),
                 sd_id = as.numeric(VarCorr(nl)[1, 2]), s = nl$sigma,
                 rho = unname(coef(nl$modelStruct$corStruct, unconstrained = FALSE)))

# ---- independent exact likelihood in plain R (balanced: one 9x9 V for all pigs) -------------
# No nugget; beta is profiled out by GLS; the variance parameters (sd_id^2 >= 0, log s,
# atanh rho) are maximised by nlminb from several starts. This is the model stated above exactly.
Y <- matrix(d$weight, 9); wk <- 1:9; Xd <- cbind(1, wk)
stopifnot(all(matrix(d$week, 9) == wk))
dll <- function(b0, b1, sd_id, s, rho, nug2 = 0) {          # direct log likelihood
  V <- sd_id^2 + s^2 * rho^abs(outer(wk, wk, "-")) + diag(nug2, 9)
  L <- chol(V); R <- Y - (b0 + b1 * wk)
  -0.5 * sum(backsolve(L, R, transpose = TRUE)^2) - 48 * sum(log(diag(L))) - 216 * log(2 * pi)
}
dev_at <- function(v, s, rho, bfix = NULL) {                 # -2 logLik with beta at its GLS value
  L <- chol(v + s^2 * rho^abs(outer(wk, wk, "-")))
  Ys <- backsolve(L, Y, transpose = TRUE); Xs <- backsolve(L, Xd, transpose = TRUE)
  b <- c(NA, NA); Yr <- Ys; Xf <- Xs
  if (!is.null(bfix)) { k <- bfix[1]; b[k] <- bfix[2]; Yr <- Ys - bfix[2] * Xs[, k]; Xf <- Xs[, -k, drop = FALSE] }
  bf <- solve(crossprod(Xf), crossprod(Xf, rowMeans(Yr)))
  b[is.na(b)] <- bf
  list(D = sum((Yr - as.vector(Xf %*% bf))^2) + 96 * sum(log(diag(L))) + 432 * log(2 * pi), b = b)
}
ctl_nl <- list(rel.tol = 1e-15, x.tol = 1e-13, eval.max = 5000, iter.max = 2000)
dprof <- function(which, value) {
  u0 <- c(v = 0, ls = log(mle[["s"]]), ar = atanh(mle[["rho"]]))
  fixu <- switch(which, sd_id = c(v = value^2), s = c(ls = log(value)), rho = c(ar = atanh(value)), NULL)
  bfix <- switch(which, `(Intercept)` = c(1, value), week = c(2, value), NULL)
  free <- setdiff(names(u0), names(fixu))
  full <- function(uf) { u <- u0; u[names(fixu)] <- fixu; u[free] <- uf; u }
  f <- function(uf) { u <- full(uf); dev_at(u[["v"]], exp(u[["ls"]]), tanh(u[["ar"]]), bfix)$D }
  lo <- ifelse(free == "v", 0, -Inf)
  best <- NULL
  for (v0 in if ("v" %in% free) c(0, 1, 6) else NA) {
    st <- u0[free]; if (!is.na(v0)) st["v"] <- v0
    o <- nlminb(st, f, lower = lo, control = ctl_nl)
    o <- nlminb(o$par, f, lower = lo, control = ctl_nl)      # restart from the solution
    if (is.null(best) || o$objective < best$objective) best <- o
  }
  u <- full(best$par); r <- dev_at(u[["v"]], exp(u[["ls"]]), tanh(u[["ar"]]), bfix)
  list(D = r$D, ri = u[["v"]] > 0,
       par = c(b0 = r$b[1], b1 = r$b[2], sd_id = sqrt(u[["v"]]), s = exp(u[["ls"]]), rho = tanh(u[["ar"]])))
}
opt_d <- dprof("none", NA)
D_hat_direct <- opt_d$D
mle_d <- opt_d$par

# ---- profiles ------------------------------------------------------------------------------
# search scale x: natural for fixed effects, log sd for sd's, theta_rho for rho; steps = SEs
mk_sc <- function(e) list(
  `(Intercept)` = list(to = identity, from = identity, est = e[["b0"]], step = se0[1]),
  week = list(to = identity, from = identity, est = e[["b1"]], step = se0[2]),
  sd_id = list(to = log, from = exp, est = log(1e-3), step = 1),   # sd_id estimate is 0
  s = list(to = log, from = exp, est = log(e[["s"]]), step = se0[3]),
  rho = list(to = theta_of, from = rho_of, est = theta_of(e[["rho"]]), step = se0[4]))
nevals <- 0
find_root <- function(Dfun, Dh, sc, which, dir) {
  g <- function(x) { nevals <<- nevals + 1; Dfun(which, sc[[which]]$from(x))$D - Dh - z^2 }
  x0 <- sc[[which]]$est; h <- unname(sc[[which]]$step); g0 <- g(x0)
  stopifnot(g0 < 0)
  gs <- g0; xs <- x0
  for (k in 1:40) {                                   # step outward until D - D_hat > z^2
    x1 <- x0 + dir * k * h; g1 <- g(x1); xs <- c(xs, x1); gs <- c(gs, g1)
    if (g1 > 0) break
  }
  stopifnot(g1 > 0, all(diff(gs) > 0))
  xa <- xs[length(xs) - 1]; ga <- gs[length(gs) - 1]
  r <- uniroot(g, sort(c(xa, x1)), tol = 1e-10, maxiter = 200,
               f.lower = if (dir > 0) ga else g1, f.upper = if (dir > 0) g1 else ga)
  at <- Dfun(which, sc[[which]]$from(r$root))
  res <- list(value = sc[[which]]$from(r$root), x = r$root, iter = r$iter, bracket_g = gs,
       check = at$D - Dh - z^2, sd_id_free = at$ri, at = as.list(at$par))
  res$maxgrad <- at$maxgrad                           # glmmTMB only: max |gradient| at the end
  res
}
t_start <- proc.time()[["elapsed"]]
est <- c(`(Intercept)` = mle[["b0"]], week = mle[["b1"]], sd_id = 0, s = mle[["s"]], rho = mle[["rho"]])
est_d <- c(`(Intercept)` = mle_d[["b0"]], week = mle_d[["b1"]], sd_id = mle_d[["sd_id"]],
           s = mle_d[["s"]], rho = mle_d[["rho"]])
sc_t <- mk_sc(mle); sc_d <- mk_sc(mle_d)
profiles <- list()
for (p in pnames) {
  ends <- list()
  for (eng in c("glmmTMB", "exact")) {
    Dfun <- if (eng == "glmmTMB") prof else dprof
    Dh <- if (eng == "glmmTMB") D_hat else D_hat_direct
    sc <- if (eng == "glmmTMB") sc_t else sc_d
    up <- find_root(Dfun, Dh, sc, p, +1)
    if (p == "sd_id") {      # boundary estimate: D(0+) - D_hat ~ 0 < z^2, no lower root
      lo <- list(value = 0, boundary = TRUE, D_minus_D_hat_at_sd_id_1e_6 = Dfun("sd_id", 1e-6)$D - Dh)
    } else lo <- find_root(Dfun, Dh, sc, p, -1)
    ends[[eng]] <- list(lower = lo, upper = up)
  }
  # cross-evaluations: each engine's D at the other engine's ends
  for (side in c("lower", "upper")) {
    if (p == "sd_id" && side == "lower") next
    xt <- ends$glmmTMB[[side]]$value; xe <- ends$exact[[side]]$value
    ends$glmmTMB[[side]]$exact_check <- dprof(p, xt)$D - D_hat_direct - z^2
    ends$exact[[side]]$glmmTMB_check <- prof(p, xe)$D - D_hat - z^2
  }
  profiles[[p]] <- list(estimate = est[[p]], lower = ends$glmmTMB$lower$value,
                        upper = ends$glmmTMB$upper$value,
                        estimate_exact = est_d[[p]], lower_exact = ends$exact$lower$value,
                        upper_exact = ends$exact$upper$value,
                        glmmTMB_lower_detail = ends$glmmTMB$lower, glmmTMB_upper_detail = ends$glmmTMB$upper,
                        exact_lower_detail = ends$exact$lower, exact_upper_detail = ends$exact$upper)
  cat(sprintf("%-12s glmmTMB %.10g [%.10g, %.10g]  exact %.10g [%.10g, %.10g]\n", p, est[[p]],
              profiles[[p]]$lower, profiles[[p]]$upper, est_d[[p]], profiles[[p]]$lower_exact,
              profiles[[p]]$upper_exact), file = stderr())
}
elapsed <- proc.time()[["elapsed"]] - t_start
# glmmTMB vs the direct likelihood (with dispformula ~0's nugget) at a point with sd_id > 0
pp <- profiles$s$glmmTMB_lower_detail$at
tmb_noise <- -prof("s", pp$s)$D / 2 - dll(pp$b0, pp$b1, pp$sd_id, pp$s, pp$rho, nug2 = sigma(m0)^2)

out <- list(
  `_about` = paste("Profile-likelihood 95% intervals (exact uniroot roots of D(psi) - D_hat = z^2, ML) for",
                   "weight ~ week + (1|id) + AR(1)(week) residuals within id on jaxmixed/data/datasets/pig.csv;",
                   "made by tests/reference/make_resid_profile.R. Parameters: (Intercept), week, sd_id (sd of",
                   "the random intercept), s (AR(1) residual sd), rho (AR(1) lag-1 correlation)."),
  method = paste("lower/upper: glmmTMB refits with psi held: fixed effects via offset (formula without that",
                 "column); sd_id, s, rho via map/start on theta (log sd_id, log s, rho/sqrt(1-rho^2)). Each",
                 "D(psi) is the smaller of the fits with (1|id) free and without (1|id) (the sd_id = 0",
                 "boundary), each polished by Newton steps on obj$fn/obj$gr. Roots by uniroot(tol = 1e-10) on",
                 "the scale natural / log sd / theta_rho, bracketed by stepping outward from the estimate in",
                 "SE-sized steps. sd_id's ML estimate is 0 (boundary), so its lower limit is 0 (no root).",
                 "lower_exact/upper_exact: the same root search on an independent exact Gaussian likelihood",
                 "in plain R (no nugget, beta by GLS, variance parameters by nlminb with sd_id^2 >= 0).",
                 "check = D(end) - D_hat - z^2 by the same engine; exact_check / glmmTMB_check = the other",
                 "engine's D at that end. dispformula = ~0 leaves a residual variance of",
                 signif(sigma(m0)^2, 3), "; with (1|id) in the model this makes TMB's inner Hessian",
                 "ill-conditioned and glmmTMB's logLik carries errors of order 1e-5 wherever sd_id > 0",
                 "(glmmTMB_minus_direct_logLik_at_s_lower), so glmmTMB's ends with sd_id > 0 at the end",
                 "(lower ends of s and rho, upper end of sd_id) are good to about 1e-5 only; the exact ones",
                 "are the precise reference."),
  glmmTMB = glmm_fit, glmmTMB_boundary_fit = glmm_bnd, nlme = nlme_fit,
  exact_fit = list(logLik = -D_hat_direct / 2, fixef = list(`(Intercept)` = mle_d[["b0"]], week = mle_d[["b1"]]),
                   sd_id = mle_d[["sd_id"]], s = mle_d[["s"]], rho = mle_d[["rho"]]),
  logLik_diff_glmmTMB_minus_nlme = glmm_fit$logLik - nlme_fit$logLik,
  logLik_diff_glmmTMB_boundary_minus_exact = glmm_bnd$logLik + D_hat_direct / 2,
  glmmTMB_minus_direct_logLik_at_s_lower = tmb_noise,
  D_hat = D_hat, D_hat_exact = D_hat_direct, z = z, z2 = z^2, level = 0.95,
  profiles = profiles,
  n_profile_evaluations = nevals, profile_seconds = elapsed,
  versions = list(R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
                  TMB = as.character(packageVersion("TMB")), nlme = as.character(packageVersion("nlme")),
                  jsonlite = as.character(packageVersion("jsonlite"))),
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"))
js <- toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE)
writeLines(js, file.path(here, "resid_profile.json"))
cat(js, "\n")
